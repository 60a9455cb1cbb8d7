"""Mask losses, point sampling and the set criterion."""
from .build import build_criterion
from .criterion import SetCriterion, build_weight_dict
from .mask_losses import (
    batch_dice_cost,
    batch_sigmoid_ce_cost,
    calculate_uncertainty,
    dice_loss,
    get_uncertain_point_coords_with_randomness,
    point_sample,
    sigmoid_ce_loss,
    sigmoid_focal_loss,
)

__all__ = [
    "SetCriterion",
    "build_criterion",
    "build_weight_dict",
    "batch_dice_cost",
    "batch_sigmoid_ce_cost",
    "calculate_uncertainty",
    "dice_loss",
    "get_uncertain_point_coords_with_randomness",
    "point_sample",
    "sigmoid_ce_loss",
    "sigmoid_focal_loss",
]
