"""Build the transformer decoder named by ``MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``."""
from ..registries import TRANSFORMER_DECODER_REGISTRY, lookup

__all__ = ["build_transformer_decoder"]

CLASS_ACTIVATIONS = ("softmax", "sigmoid")


def build_transformer_decoder(cfg, in_channels: int, mask_classification: bool = True):
    """Return the registered decoder, checked for the attributes the meta-architecture reads."""
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    decoder_cls = lookup(TRANSFORMER_DECODER_REGISTRY, name, "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME")
    activation = getattr(decoder_cls, "class_activation", None)
    if activation not in CLASS_ACTIVATIONS:
        raise TypeError(
            f"Transformer decoder {name} must declare class_activation in {CLASS_ACTIVATIONS}, got {activation!r}."
        )
    if not getattr(decoder_cls, "matcher_name", None):
        raise TypeError(f"Transformer decoder {name} must declare the matcher it needs (matcher_name).")
    return decoder_cls(cfg, in_channels, mask_classification)
