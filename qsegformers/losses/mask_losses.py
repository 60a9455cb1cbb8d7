"""The per-mask losses shared by every criterion (point sampling and the pairwise matching costs live in
``qsegformers.layers`` and are re-exported here).

Masks are compared on points rather than on full maps (PointRend-style): a point is an (x, y)
pair in [0, 1] normalised image coordinates, so masks of different resolutions are compared at
the same physical locations. Losses take mask *logits* and {0, 1} (or soft) targets.

Shapes used below: N masks, P points per mask, Q predictions, T targets.
"""
import torch
import torch.nn.functional as F

from ..layers.mask_costs import DICE_SMOOTH, batch_dice_cost, batch_sigmoid_ce_cost
from ..layers.point_sampling import calculate_uncertainty, get_uncertain_point_coords_with_randomness, point_sample

__all__ = [
    "point_sample",
    "calculate_uncertainty",
    "get_uncertain_point_coords_with_randomness",
    "dice_loss",
    "sigmoid_ce_loss",
    "sigmoid_focal_loss",
    "batch_dice_cost",
    "batch_sigmoid_ce_cost",
]

def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Soft dice loss ``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)``, summed over masks / num_masks.

    Args:
        inputs: N x ... mask logits (flattened from dim 1).
        targets: N x ... targets in [0, 1], same shape.
        num_masks: normaliser (number of target masks in the batch).

    Returns:
        Scalar tensor.
    """
    probs = inputs.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + DICE_SMOOTH) / (denominator + DICE_SMOOTH)
    return loss.sum() / num_masks


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Binary cross-entropy on logits, averaged over points, summed over masks / num_masks.

    Args:
        inputs: N x ... mask logits (flattened from dim 1).
        targets: N x ... targets in [0, 1], same shape.
        num_masks: normaliser.

    Returns:
        Scalar tensor.
    """
    loss = F.binary_cross_entropy_with_logits(inputs.flatten(1), targets.flatten(1), reduction="none")
    return loss.mean(1).sum() / num_masks


def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_masks: float,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal loss ``-alpha_t (1 - p_t)^gamma log p_t``, mean over points, sum over masks / num_masks.

    Args:
        inputs: N x ... logits (flattened from dim 1).
        targets: N x ... targets in [0, 1], same shape.
        num_masks: normaliser. Passing N gives the mean over all N x P elements.
        alpha: weight of positives (1 - alpha for negatives); a negative value disables weighting.
        gamma: focusing exponent.

    Returns:
        Scalar tensor.
    """
    inputs = inputs.flatten(1)
    targets = targets.flatten(1)
    probs = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = probs * targets + (1 - probs) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.mean(1).sum() / num_masks
