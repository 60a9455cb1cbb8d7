"""CI check that the CUDA kernels of qsegformers._C compile (FORCE_CUDA=1, one architecture), on a
machine without a GPU. Compile only: the kernels run in tests only when a GPU is present."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.cpp_extension import CUDA_HOME

REPO = Path(__file__).resolve().parents[2]


def _toolkit():
    """The CUDA toolkit to build with: $CUDA_HOME, or /usr/local/cuda, or torch's guess (from nvcc)."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", CUDA_HOME):
        if home and (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "lib64").exists():
            return home
    return None


@pytest.mark.skipif(_toolkit() is None, reason="no CUDA toolkit (nvcc) on this machine")
def test_cuda_kernels_compile(tmp_path):
    # About a minute for one architecture on the 2-core CI machine.
    env = dict(os.environ, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0", CUDA_HOME=_toolkit(), MAX_JOBS="2")
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
           "--build-temp", str(tmp_path / "tmp")]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    libraries = list((tmp_path / "lib" / "qsegformers").glob("_C*.so"))
    assert len(libraries) == 1
    symbols = subprocess.run(["nm", "-C", str(libraries[0])], capture_output=True, text=True, check=True).stdout
    assert "ms_deform_attn_forward_cuda" in symbols and "ms_deform_attn_backward_cuda" in symbols
    # The device code for the requested architecture is embedded.
    assert b"sm_90" in libraries[0].read_bytes()
