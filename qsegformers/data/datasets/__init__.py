"""Dataset registration. Importing this package registers the generated ``qseg_toy_*`` datasets."""
from .toy import TOY_DATASET_NAMES, default_toy_root, generate_toy_dataset, register_toy_datasets

__all__ = ["TOY_DATASET_NAMES", "default_toy_root", "generate_toy_dataset", "register_toy_datasets"]
