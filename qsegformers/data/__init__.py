"""Datasets (registration, the generated ``qseg_toy`` data) and the training dataset mappers."""
from . import datasets, mappers  # noqa: F401  (register datasets and mappers)
from .mappers import build_dataset_mapper

__all__ = ["build_dataset_mapper"]
