"""Build a matcher from its registry name."""
from torch import nn

from ..registries import MATCHER_REGISTRY, lookup

__all__ = ["build_matcher"]


def build_matcher(cfg, name: str) -> nn.Module:
    """Return ``MATCHER_REGISTRY[name](cfg)``; an unknown name raises a KeyError naming
    ``MODEL.MASK_FORMER.MATCHER_NAME`` and the registered choices."""
    lookup(MATCHER_REGISTRY, name, "MODEL.MASK_FORMER.MATCHER_NAME")
    return MATCHER_REGISTRY.get(name)(cfg)
