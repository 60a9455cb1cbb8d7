"""Pairwise mask costs (every prediction against every target) for matching; each entry equals the
corresponding per-mask loss of ``qsegformers.losses.mask_losses`` on that pair. Shapes: Q predictions,
T targets, P points.
"""
import torch
import torch.nn.functional as F

__all__ = ["DICE_SMOOTH", "batch_dice_cost", "batch_sigmoid_ce_cost"]

# Added to numerator and denominator of the dice ratio so that two empty masks give loss 0.
DICE_SMOOTH = 1.0


def batch_dice_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise dice loss between every prediction and every target.

    Args:
        inputs: Q x P mask logits.
        targets: T x P targets in [0, 1].

    Returns:
        Q x T costs; entry (q, t) equals ``dice_loss(inputs[q:q+1], targets[t:t+1], 1)``.
    """
    probs = inputs.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * torch.einsum("qp,tp->qt", probs, targets)
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + DICE_SMOOTH) / (denominator + DICE_SMOOTH)


def batch_sigmoid_ce_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise binary cross-entropy (mean over points) between every prediction and target.

    BCE(x, t) = t * BCE(x, 1) + (1 - t) * BCE(x, 0), so the pairwise sums are two matrix products.

    Args:
        inputs: Q x P mask logits.
        targets: T x P targets in [0, 1].

    Returns:
        Q x T costs; entry (q, t) equals ``sigmoid_ce_loss(inputs[q:q+1], targets[t:t+1], 1)``.
    """
    inputs = inputs.flatten(1)
    targets = targets.flatten(1)
    num_points = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    cost = torch.einsum("qp,tp->qt", pos, targets) + torch.einsum("qp,tp->qt", neg, 1 - targets)
    return cost / num_points
