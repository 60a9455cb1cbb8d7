"""Mask losses and the set criteria. Importing the package registers every criterion in CRITERION_REGISTRY
(SetCriterion, MPCriterion, PFTCriterion, ATMCriterion), so a criterion exists whether or not its decoder
was imported."""
from . import atm_criterion, mp_criterion, pft_criterion  # noqa: F401  (registrations)
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
