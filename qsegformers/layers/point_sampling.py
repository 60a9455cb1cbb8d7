"""PointRend-style point sampling of mask logits, shared by the criteria and the Hungarian matcher.

A point is an (x, y) pair in [0, 1] normalised image coordinates, so masks of different resolutions are
compared at the same physical locations. Shapes: N masks, P points per mask.
"""
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["point_sample", "calculate_uncertainty", "get_uncertain_point_coords_with_randomness"]


def point_sample(input: torch.Tensor, point_coords: torch.Tensor, **grid_sample_kwargs) -> torch.Tensor:
    """Bilinearly sample ``input`` at normalised points.

    Args:
        input: N x C x H x W maps.
        point_coords: N x P x 2 points, or N x Hg x Wg x 2 grid of points, as (x, y) in [0, 1]
            (0 = left/top image border, 1 = right/bottom border).
        grid_sample_kwargs: passed to ``F.grid_sample``; ``align_corners`` defaults to False,
            the convention in which pixel i covers [i / W, (i + 1) / W).

    Returns:
        N x C x P values (or N x C x Hg x Wg for a grid).
    """
    grid_sample_kwargs.setdefault("align_corners", False)
    flat = point_coords.dim() == 3
    if flat:
        point_coords = point_coords.unsqueeze(2)
    output = F.grid_sample(input, 2.0 * point_coords - 1.0, **grid_sample_kwargs)
    if flat:
        output = output.squeeze(3)
    return output


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of class-agnostic mask logits: ``-|logit|`` (highest at the decision boundary).

    Args:
        logits: N x 1 x P (or N x 1 x H x W) mask logits.

    Returns:
        Tensor of the same shape.
    """
    if logits.shape[1] != 1:
        raise ValueError(f"calculate_uncertainty expects one channel (N x 1 x ...), got shape {tuple(logits.shape)}")
    return -logits.abs()


def get_uncertain_point_coords_with_randomness(
    coarse_logits: torch.Tensor,
    uncertainty_func: Callable[[torch.Tensor], torch.Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> torch.Tensor:
    """PointRend importance sampling of the points where the prediction is least certain.

    Draws ``int(num_points * oversample_ratio)`` uniform points, keeps the
    ``int(importance_sample_ratio * num_points)`` most uncertain of them and fills the rest of the
    ``num_points`` with fresh uniform points.

    Args:
        coarse_logits: N x C x H x W logits.
        uncertainty_func: maps N x C x P sampled logits to N x 1 x P uncertainties (higher = less
            certain), e.g. :func:`calculate_uncertainty`.
        num_points: P, points returned per map.
        oversample_ratio: k >= 1.
        importance_sample_ratio: beta in [0, 1].

    Returns:
        N x P x 2 point coordinates (x, y) in [0, 1], same dtype and device as ``coarse_logits``.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    num_boxes = coarse_logits.shape[0]
    factory = {"dtype": coarse_logits.dtype, "device": coarse_logits.device}
    num_sampled = int(num_points * oversample_ratio)
    point_coords = torch.rand(num_boxes, num_sampled, 2, **factory)
    point_uncertainties = uncertainty_func(point_sample(coarse_logits, point_coords, align_corners=False))
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(point_uncertainties[:, 0, :], k=num_uncertain, dim=1)[1]
    point_coords = torch.gather(point_coords, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        point_coords = torch.cat([point_coords, torch.rand(num_boxes, num_random, 2, **factory)], dim=1)
    return point_coords
