"""Mask2Former's optimizer: per-parameter LR and weight decay, SGD or AdamW, full-model clipping.

Hyper-parameters of one parameter, in the order they are applied (later rules win):

* base: ``SOLVER.BASE_LR`` and ``SOLVER.WEIGHT_DECAY``;
* a parameter of a module whose name starts with ``backbone``: LR x ``SOLVER.BACKBONE_MULTIPLIER``;
* Swin's ``relative_position_bias_table`` / ``absolute_pos_embed``: weight decay 0;
* a parameter of a normalization layer: ``SOLVER.WEIGHT_DECAY_NORM``;
* an ``nn.Embedding`` weight (e.g. the learnable queries): ``SOLVER.WEIGHT_DECAY_EMBED``.

A parameter shared by several modules is optimized once, with the hyper-parameters of the first
module that owns it. Parameters with equal hyper-parameters are merged into one group (fast
multi-tensor optimizers; detectron2's ``reduce_param_groups``).
"""
import logging
from typing import Any, Dict, List

import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.solver.build import maybe_add_gradient_clipping, reduce_param_groups

__all__ = [
    "build_optimizer",
    "get_mask2former_param_groups",
    "NORM_MODULE_TYPES",
    "FullModelClippedSGD",
    "FullModelClippedAdamW",
]

logger = logging.getLogger(__name__)

BACKBONE_PREFIX = "backbone"
# Position tables of Swin-style backbones, never weight-decayed (as in Swin and Mask2Former).
NO_WEIGHT_DECAY_PARAM_NAMES = ("relative_position_bias_table", "absolute_pos_embed")
SUPPORTED_OPTIMIZERS = ("SGD", "ADAMW")
FULL_MODEL_CLIP_TYPE = "full_model"
DETECTRON2_CLIP_TYPES = ("value", "norm")  # per-parameter clipping done by detectron2


def _norm_module_types() -> tuple:
    types = [
        torch.nn.BatchNorm1d,
        torch.nn.BatchNorm2d,  # also detectron2's NaiveSyncBatchNorm
        torch.nn.BatchNorm3d,
        torch.nn.SyncBatchNorm,
        torch.nn.InstanceNorm1d,
        torch.nn.InstanceNorm2d,
        torch.nn.InstanceNorm3d,
        torch.nn.GroupNorm,
        torch.nn.LayerNorm,
        torch.nn.LocalResponseNorm,
        torch.nn.CrossMapLRN2d,
        FrozenBatchNorm2d,  # has no parameters, listed for completeness
    ]
    if hasattr(torch.nn, "RMSNorm"):
        types.append(torch.nn.RMSNorm)
    from detectron2.layers import batch_norm

    if hasattr(batch_norm, "LayerNorm"):  # channels-first LayerNorm of newer detectron2
        types.append(batch_norm.LayerNorm)
    return tuple(types)


NORM_MODULE_TYPES = _norm_module_types()


def get_mask2former_param_groups(
    model: torch.nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float,
    weight_decay_embed: float,
    backbone_multiplier: float,
) -> List[Dict[str, Any]]:
    """Return optimizer parameter groups (``params``, ``lr``, ``weight_decay``) for ``model``.

    Only parameters with ``requires_grad`` are included, each exactly once.
    """
    params: List[Dict[str, Any]] = []
    seen = set()
    for module_name, module in model.named_modules():
        for param_name, value in module.named_parameters(recurse=False):
            if not value.requires_grad or value in seen:
                continue
            seen.add(value)
            hyperparams = {"lr": base_lr, "weight_decay": weight_decay}
            if module_name.startswith(BACKBONE_PREFIX):
                hyperparams["lr"] = base_lr * backbone_multiplier
            if any(name in param_name for name in NO_WEIGHT_DECAY_PARAM_NAMES):
                hyperparams["weight_decay"] = 0.0
            if isinstance(module, NORM_MODULE_TYPES):
                hyperparams["weight_decay"] = weight_decay_norm
            if isinstance(module, torch.nn.Embedding):
                hyperparams["weight_decay"] = weight_decay_embed
            params.append({"params": [value], **hyperparams})
    return reduce_param_groups(params)


class _FullModelGradientClipping:
    """Optimizer mixin: clip the gradient norm over *all* parameters before every step.

    Mask2Former's ``CLIP_TYPE: full_model``; detectron2 v0.6 only clips parameter by parameter.
    """

    def __init__(self, params, *args, clip_max_norm: float, clip_norm_type: float, **kwargs):
        self.clip_max_norm = clip_max_norm
        self.clip_norm_type = clip_norm_type
        super().__init__(params, *args, **kwargs)

    def step(self, closure=None):
        all_params = [p for group in self.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(all_params, self.clip_max_norm, self.clip_norm_type)
        return super().step(closure)


class FullModelClippedSGD(_FullModelGradientClipping, torch.optim.SGD):
    """SGD with full-model gradient-norm clipping."""


class FullModelClippedAdamW(_FullModelGradientClipping, torch.optim.AdamW):
    """AdamW with full-model gradient-norm clipping."""


_OPTIMIZER_CLASSES = {
    "SGD": (torch.optim.SGD, FullModelClippedSGD),
    "ADAMW": (torch.optim.AdamW, FullModelClippedAdamW),
}


def _clip_mode(cfg) -> str:
    """Return "none", "full_model" or "detectron2", validating the clipping keys."""
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return "none"
    if clip.CLIP_TYPE == FULL_MODEL_CLIP_TYPE:
        if clip.CLIP_VALUE <= 0:
            raise ValueError(
                f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE = {clip.CLIP_VALUE} must be > 0 for "
                f"CLIP_TYPE {FULL_MODEL_CLIP_TYPE!r} (it is the maximum total gradient norm)."
            )
        return FULL_MODEL_CLIP_TYPE
    if clip.CLIP_TYPE in DETECTRON2_CLIP_TYPES:
        return "detectron2"
    choices = ", ".join(repr(c) for c in (FULL_MODEL_CLIP_TYPE,) + DETECTRON2_CLIP_TYPES)
    raise ValueError(
        f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE = {clip.CLIP_TYPE!r} is not supported; choose one of {choices}."
    )


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Build the optimizer selected by ``SOLVER.OPTIMIZER`` ("SGD" or "ADAMW") for ``model``."""
    name = cfg.SOLVER.OPTIMIZER
    if name not in _OPTIMIZER_CLASSES:
        raise ValueError(
            f"SOLVER.OPTIMIZER = {name!r} is not supported; choose one of "
            f"{', '.join(repr(n) for n in SUPPORTED_OPTIMIZERS)}."
        )
    clip_mode = _clip_mode(cfg)
    params = get_mask2former_param_groups(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        weight_decay_embed=cfg.SOLVER.WEIGHT_DECAY_EMBED,
        backbone_multiplier=cfg.SOLVER.BACKBONE_MULTIPLIER,
    )
    plain_cls, full_model_cls = _OPTIMIZER_CLASSES[name]
    kwargs: Dict[str, Any] = {"lr": cfg.SOLVER.BASE_LR}
    if name == "SGD":
        kwargs.update(momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV)

    if clip_mode == FULL_MODEL_CLIP_TYPE:
        clip = cfg.SOLVER.CLIP_GRADIENTS
        optimizer = full_model_cls(
            params, clip_max_norm=clip.CLIP_VALUE, clip_norm_type=clip.NORM_TYPE, **kwargs
        )
    elif clip_mode == "detectron2":
        optimizer = maybe_add_gradient_clipping(cfg, plain_cls)(params, **kwargs)
    else:
        optimizer = plain_cls(params, **kwargs)
    logger.info(
        "Optimizer %s (gradient clipping: %s) with %d parameter groups.",
        type(optimizer).__name__,
        clip_mode,
        len(optimizer.param_groups),
    )
    return optimizer
