"""Shared pytest set-up: generated data goes to a per-session temporary folder, never into the repo."""
import os
import tempfile

import pytest

# The toy dataset is generated once per test session into a temporary folder (set before qsegformers
# registers it, so every test and subprocess sees the same root).
os.environ.setdefault("QSEG_TOY_DATASET", os.path.join(tempfile.mkdtemp(prefix="qseg_toy_"), "qseg_toy"))

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "reference")


@pytest.fixture(scope="session")
def reference_dir():
    """Folder of the official Mask2Former reference facts (state-dict listings and merged configs)."""
    return REFERENCE_DIR
