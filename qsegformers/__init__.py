"""qsegformers: query-based segmentation decoders as interchangeable detectron2 parts.

Importing the package registers every backbone, pixel decoder, transformer decoder, matcher,
meta-architecture and dataset mapper under its name.
"""
from . import d2_compat  # noqa: F401  (must run before other detectron2 imports are used)
from .config import add_qsegformers_config

__all__ = ["add_qsegformers_config"]
