"""Build and install qsegformers (``pip install --no-build-isolation -e .``; see setup.sh)."""
from setuptools import find_packages, setup

setup(
    name="qsegformers",
    version="0.1.0",
    description="Query-based image segmentation (Mask2Former, PFT, FASeg, MP-Former, SegViT) on detectron2",
    packages=find_packages(include=["qsegformers", "qsegformers.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "torchvision", "fvcore", "pycocotools", "scipy", "opencv-python-headless"],
)
