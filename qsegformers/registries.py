"""The registries of every swappable stage, and a lookup that fails with a clear message.

Backbones, sem-seg heads and meta-architectures use detectron2's own registries
(``BACKBONE_REGISTRY``, ``SEM_SEG_HEADS_REGISTRY``, ``META_ARCH_REGISTRY``).
"""
from detectron2.utils.registry import Registry

__all__ = [
    "PIXEL_DECODER_REGISTRY",
    "TRANSFORMER_DECODER_REGISTRY",
    "MATCHER_REGISTRY",
    "CRITERION_REGISTRY",
    "DATASET_MAPPER_REGISTRY",
    "lookup",
]

PIXEL_DECODER_REGISTRY = Registry("PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = "Pixel decoders: backbone features -> mask features + multi-scale features."

# Official Mask2Former name of this registry, so that official code that registers into it reads the same.
TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = "Transformer decoders: queries x pixel features -> class and mask predictions."

MATCHER_REGISTRY = Registry("MATCHER")
MATCHER_REGISTRY.__doc__ = "Matchers: predictions x targets -> (prediction index, target index) pairs per image."

CRITERION_REGISTRY = Registry("CRITERION")
CRITERION_REGISTRY.__doc__ = (
    "Criteria: (decoder outputs, targets) -> unweighted loss dict. Each class provides "
    "``from_config(cfg, num_classes, matcher)``; a decoder names its default in ``criterion_name``."
)

DATASET_MAPPER_REGISTRY = Registry("DATASET_MAPPER")
DATASET_MAPPER_REGISTRY.__doc__ = "Dataset mappers selected by INPUT.DATASET_MAPPER_NAME."


def lookup(registry: Registry, name: str, config_key: str):
    """Return the object registered as ``name``, or raise a KeyError naming the key and the choices."""
    if name in registry:
        return registry.get(name)
    choices = ", ".join(sorted(k for k, _ in registry))
    raise KeyError(
        f"{config_key} = {name!r} is not a registered {registry._name.lower()} name. "
        f"Choose one of: {choices}. (Is the module that registers it imported?)"
    )
