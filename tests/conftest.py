"""Shared pytest set-up: generated data goes to a per-session temporary folder, never into the repo."""
import os
import tempfile

import pytest
import torch

# The toy dataset is generated once per test session into a temporary folder (set before qsegformers
# registers it, so every test and subprocess sees the same root).
os.environ.setdefault("QSEG_TOY_DATASET", os.path.join(tempfile.mkdtemp(prefix="qseg_toy_"), "qseg_toy"))

# One intra-op thread: on the 2-core CI machines, torch's OpenMP threads slow small ops down by an
# order of magnitude (measured: ResNet-18 forward 0.10 s with 1 thread, 1.3 s with 2). Subprocesses
# inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "reference")


@pytest.fixture(scope="session")
def reference_dir():
    """Folder of the official Mask2Former reference facts (state-dict listings and merged configs)."""
    return REFERENCE_DIR
