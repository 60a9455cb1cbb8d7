"""Noise of MP-Former's mask-piloted queries: GT-mask downsampling, point / shift / scale mask noise and
label-flip noise (spec: shared/specs/mpformer.md, sections 2.3, 3.2 and 3.3).

Every function draws from torch's global generator on the input's device, so a fixed seed fixes the noise.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["downsample_gt", "point_noise", "geometric_noise", "resize_nearest", "label_noise"]

# "Any GT pixel inside the cell" after area interpolation (the official code's threshold).
AREA_ANY_EPS = 1e-8
BILINEAR_THRESHOLD = 0.5


def downsample_gt(masks: Tensor, size: Tuple[int, int], mode: str = "area_any") -> Tensor:
    """N x H x W binary masks -> N x h x w bool masks at ``size``.

    mode: "area_any" (a cell is foreground iff any of its GT pixels is), "nearest", or "bilinear_0.5"
    (bilinear interpolation >= 0.5).
    """
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size), dtype=torch.bool)
    x = masks[:, None].float()
    if mode == "area_any":
        return F.interpolate(x, size=size, mode="area")[:, 0] > AREA_ANY_EPS
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")[:, 0] > BILINEAR_THRESHOLD
    if mode == "bilinear_0.5":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[:, 0] >= BILINEAR_THRESHOLD
    raise ValueError(f"unknown GT downsampling mode {mode!r}")


def point_noise(masks: Tensor, ratio: float, mode: str = "uniform_count") -> Tensor:
    """Flip random pixels of every ... x h x w bool mask independently; returns the same shape.

    With a = the mask's foreground area, "uniform_count" flips n ~ U{0, ..., floor(ratio * a)} distinct
    pixels chosen uniformly over the whole map (paper); "bernoulli" flips each pixel with probability
    ratio * a / (h * w) (official code).
    """
    if ratio <= 0 or masks.numel() == 0:
        return masks.clone()
    flat = masks.flatten(-2)
    num_pixels = flat.shape[-1]
    area = flat.sum(-1, keepdim=True).float()
    if mode == "uniform_count":
        max_flips = torch.floor(ratio * area).clamp(max=num_pixels)
        count = torch.floor(torch.rand_like(max_flips) * (max_flips + 1))
        # Rank of each pixel in a random permutation: the first ``count`` ranks are flipped.
        ranks = torch.rand(flat.shape, device=flat.device).argsort(-1).argsort(-1)
        flip = ranks < count
    elif mode == "bernoulli":
        flip = torch.rand(flat.shape, device=flat.device) < ratio * area / num_pixels
    else:
        raise ValueError(f"unknown point-noise mode {mode!r}")
    return (flat ^ flip).view_as(masks)


def _boxes(masks: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """N x h x w bool -> centre y, centre x, box height, box width (pixels, float) and non-empty flag."""
    rows, cols = masks.any(-1), masks.any(-2)
    h, w = masks.shape[-2:]
    ys = torch.arange(h, device=masks.device, dtype=torch.float32)
    xs = torch.arange(w, device=masks.device, dtype=torch.float32)
    big = float(max(h, w))
    y0 = torch.where(rows, ys, big).amin(-1)
    y1 = torch.where(rows, ys, -big).amax(-1)
    x0 = torch.where(cols, xs, big).amin(-1)
    x1 = torch.where(cols, xs, -big).amax(-1)
    valid = rows.any(-1)
    zero = torch.zeros_like(y0)
    cy, cx = torch.where(valid, (y0 + y1) / 2, zero), torch.where(valid, (x0 + x1) / 2, zero)
    bh, bw = torch.where(valid, y1 - y0 + 1, zero), torch.where(valid, x1 - x0 + 1, zero)
    return cy, cx, bh, bw, valid


def geometric_noise(masks: Tensor, shift_scale: float = 0.0, scale_scale: float = 0.0) -> Tensor:
    """Shift and/or scale every N x h x w bool mask about its box centre (nearest sampling); returns N x h x w.

    Shift: (dy, dx) = U(-1, 1) * (box size / 2) * shift_scale, so the centre stays inside the box.
    Scale: factor U(1 - scale_scale, 1 + scale_scale). Pixels moved outside the map are dropped; empty
    masks are returned unchanged.
    """
    n, h, w = masks.shape
    if n == 0:
        return masks.clone()
    cy, cx, bh, bw, _ = _boxes(masks)
    dy = (torch.rand(n, device=masks.device) * 2 - 1) * bh / 2 * shift_scale
    dx = (torch.rand(n, device=masks.device) * 2 - 1) * bw / 2 * shift_scale
    factor = 1 + (torch.rand(n, device=masks.device) * 2 - 1) * scale_scale
    ys = torch.arange(h, device=masks.device, dtype=torch.float32)[None, :, None]
    xs = torch.arange(w, device=masks.device, dtype=torch.float32)[None, None, :]
    # Inverse map: output pixel p came from centre + (p - centre - shift) / factor.
    src_y = torch.round(cy[:, None, None] + (ys - cy[:, None, None] - dy[:, None, None]) / factor[:, None, None])
    src_x = torch.round(cx[:, None, None] + (xs - cx[:, None, None] - dx[:, None, None]) / factor[:, None, None])
    inside = (src_y >= 0) & (src_y < h) & (src_x >= 0) & (src_x < w)
    src_y = src_y.clamp(0, h - 1).long().expand(n, h, w)
    src_x = src_x.clamp(0, w - 1).long().expand(n, h, w)
    index = torch.arange(n, device=masks.device)[:, None, None].expand(n, h, w)
    return masks[index, src_y, src_x] & inside


def resize_nearest(masks: Tensor, size: Tuple[int, int]) -> Tensor:
    """... x h x w bool -> ... x size bool by nearest sampling."""
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    if flat.shape[0] == 0:
        return masks.new_zeros((*lead, *size))
    return (F.interpolate(flat, size=size, mode="nearest") > BILINEAR_THRESHOLD).view(*lead, *size)


def label_noise(labels: Tensor, ratio: float, num_classes: int) -> Tensor:
    """Replace each label with probability ``ratio`` by a class drawn uniformly from [0, num_classes)."""
    if ratio <= 0 or labels.numel() == 0:
        return labels.clone()
    flip = torch.rand(labels.shape, device=labels.device) < ratio
    random = torch.randint(0, num_classes, labels.shape, device=labels.device, dtype=labels.dtype)
    return torch.where(flip, random, labels)
