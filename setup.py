"""Build and install qsegformers (``pip install --no-build-isolation -e .``; see setup.sh).

Compiled ops: the extension ``qsegformers._C`` (multi-scale deformable attention, sources in
``qsegformers/ops/csrc``) is built with torch.utils.cpp_extension, so torch must be installed first
(hence ``--no-build-isolation``).

* The C++ CPU kernel is always built.
* The CUDA kernel is added when a CUDA toolkit is found (``torch.utils.cpp_extension.CUDA_HOME``,
  i.e. ``$CUDA_HOME`` or the ``nvcc`` on PATH) and either a GPU is visible or ``FORCE_CUDA=1`` is
  set (to build for GPUs on a machine without one, e.g. in CI or a Docker build).
* ``TORCH_CUDA_ARCH_LIST`` chooses the GPU architectures, e.g. ``TORCH_CUDA_ARCH_LIST="8.0;9.0"``
  (append ``+PTX`` to embed PTX for newer GPUs). Unset, torch builds for the visible GPUs, or for a
  default list of architectures when none is visible.
* ``QSEG_NO_EXT=1`` skips the extension entirely; the model then runs the pure-PyTorch op.

Without the extension everything still works: ``MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTN_IMPL="auto"``
falls back to the pure-PyTorch path with one warning.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

CSRC = os.path.join("qsegformers", "ops", "csrc")


def _extensions():
    """The ``qsegformers._C`` extension (CPU, plus CUDA when available) and the build_ext command."""
    if os.environ.get("QSEG_NO_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    cxx_flags = ["-O3"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inlined into our code: without OpenMP it runs serially. The library
        # resolves to the libgomp.so.1 that torch already loaded.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    with_cuda = CUDA_HOME is not None and (torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1")
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        extension = CUDAExtension(
            "qsegformers._C",
            sources,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )
    else:
        extension = CppExtension(
            "qsegformers._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="qsegformers",
    version="0.1.0",
    description="Query-based image segmentation (Mask2Former, PFT, FASeg, MP-Former, SegViT) on detectron2",
    packages=find_packages(include=["qsegformers", "qsegformers.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "torchvision", "fvcore", "pycocotools", "scipy", "opencv-python-headless"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
