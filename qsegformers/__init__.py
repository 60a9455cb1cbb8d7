"""qsegformers: query-based segmentation decoders as interchangeable detectron2 parts.

Importing the package registers every backbone, pixel decoder, transformer decoder, matcher,
meta-architecture, dataset mapper and dataset under its name.
"""
from . import d2_compat  # noqa: F401  (detectron2 v0.6 workarounds; first, before other modules use it)
from . import backbones, data, decoders, matching, ops, pixel_decoders  # noqa: F401  (registrations)
from . import head, meta_arch  # noqa: F401  (MaskFormerHead, MaskFormer)
from .config import add_qsegformers_config

__all__ = ["add_qsegformers_config"]
