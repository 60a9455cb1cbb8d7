"""Build the transformer decoder named by ``MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``."""
from ..registries import TRANSFORMER_DECODER_REGISTRY, lookup
from .base import CLASS_ACTIVATIONS, QueryDecoder

__all__ = ["build_transformer_decoder"]


def build_transformer_decoder(cfg, in_channels: int, mask_classification: bool = True):
    """Return the registered decoder, checked for the capabilities the meta-architecture reads."""
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    decoder_cls = lookup(TRANSFORMER_DECODER_REGISTRY, name, "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME")
    if not issubclass(decoder_cls, QueryDecoder):
        raise TypeError(
            f"Transformer decoder {name} must subclass qsegformers.decoders.base.QueryDecoder (the decoder contract)."
        )
    if decoder_cls.class_activation not in CLASS_ACTIVATIONS:
        raise TypeError(
            f"Transformer decoder {name} must declare class_activation in {CLASS_ACTIVATIONS}, "
            f"got {decoder_cls.class_activation!r}."
        )
    if not decoder_cls.matcher_name:
        raise TypeError(f"Transformer decoder {name} must declare the matcher it needs (matcher_name).")
    return decoder_cls(cfg, in_channels, mask_classification)
