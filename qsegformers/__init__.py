"""qsegformers: query-based segmentation decoders as interchangeable detectron2 parts.

Importing the package registers every backbone, pixel decoder, transformer decoder, matcher,
meta-architecture, dataset mapper and dataset under its name.
"""
from . import d2_compat  # noqa: F401  (detectron2 v0.6 workarounds; first, before other modules use it)
# Registrations, lowest layer first: each package registers its own parts in its __init__.
from . import ops, layers, backbones, pixel_decoders, decoders, matching, losses, data  # noqa: F401
from . import head, meta_arch  # noqa: F401  (MaskFormerHead, MaskFormer)
from .config import add_qsegformers_config

__all__ = ["add_qsegformers_config"]
