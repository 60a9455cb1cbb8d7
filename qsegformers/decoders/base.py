"""The decoder contract: what every registered transformer decoder declares and returns.

A decoder is built by :func:`qsegformers.decoders.build.build_transformer_decoder` as
``decoder_cls(cfg, in_channels, mask_classification)`` and called as
``forward(features, mask_features, mask=None, targets=None) -> dict``:

* ``features``: the pixel decoder's multi-scale levels, coarse to fine, each B x C_in x H_l x W_l;
* ``mask_features``: B x D x H/4 x W/4 per-pixel mask features;
* ``mask``: padding mask (accepted for the contract; the decoders here do not read it);
* ``targets``: the training targets (per image ``labels`` T, ``masks`` T x H x W), read only by
  training-time extensions such as mask-piloted queries;
* returns ``pred_logits`` (B x Q x C_cls class logits), ``pred_masks`` (B x Q x H' x W' mask logits),
  ``aux_outputs`` (a list of dicts with the same keys for the earlier predictions) and method extras
  under their own keys.

The class attributes below are the decoder's declared capabilities: the meta-architecture, the builder
and the start-up config validation read them from the class instead of guessing from names.
"""
from typing import Optional, Tuple

from torch import nn

__all__ = ["QueryDecoder", "CLASS_ACTIVATIONS"]

CLASS_ACTIVATIONS: Tuple[str, ...] = ("softmax", "sigmoid")  # the class heads inference knows


class QueryDecoder(nn.Module):
    """Base class of every registered transformer decoder (declarations only; no parameters)."""

    # "softmax": K + 1 columns, the last one "no object"; "sigmoid": one independent logit per class.
    class_activation: str = ""
    matcher_name: str = ""  # MATCHER_REGISTRY name of the matcher this decoder's outputs are trained with
    criterion_name: str = ""  # CRITERION_REGISTRY name of the criterion that supervises its outputs
    queries_are_classes: bool = False  # query k stands for class k (pred_logits diagonal): inference skips the sum
    # Multi-scale levels the decoder reads (MODEL.SEM_SEG_HEAD.IN_FEATURES needs at least this many);
    # None: it reads however many the head gives.
    num_feature_levels: Optional[int] = None
