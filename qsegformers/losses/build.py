"""Build a criterion from its registry name."""
from torch import nn

from ..registries import CRITERION_REGISTRY, lookup

__all__ = ["build_criterion"]


def build_criterion(cfg, name: str, num_classes: int, matcher: nn.Module) -> nn.Module:
    """Return ``CRITERION_REGISTRY[name].from_config(cfg, num_classes, matcher)``; an unknown name
    raises a KeyError naming ``MODEL.MASK_FORMER.CRITERION_NAME`` and the registered choices."""
    return lookup(CRITERION_REGISTRY, name, "MODEL.MASK_FORMER.CRITERION_NAME").from_config(cfg, num_classes, matcher)
