"""SeMask semantic-prior loss: fuse the backbone's per-stage prior logits and supervise them with a CE.

The fuse is parameter-free (SeMask spec §2.5): every prior is bilinearly upsampled to the stride-4 grid,
the logits are summed without normalisation, and the sum is upsampled x4 to the padded image size. The
loss (§3) is a K-way CE averaged over non-ignored pixels, computed once per iteration.
"""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backbones.swin_config import SEMASK_PRIOR_LOSS_WEIGHT_DEFAULT, resolve_compat_key

__all__ = [
    "IGNORE_LABEL",
    "PRIOR_LOSS_KEY",
    "fuse_priors",
    "semantic_targets",
    "semask_prior_loss",
    "prior_loss_weight_from_config",
]

IGNORE_LABEL = 255  # default label of ignored / padded pixels (MODEL.SEM_SEG_HEAD.IGNORE_VALUE)
PRIOR_LOSS_KEY = "loss_sem_prior"
FUSE_STRIDE = 4  # the priors are summed on the stride-4 grid (the finest Swin stage)


def fuse_priors(priors: List[Tensor], image_size: Tuple[int, int], align_corners: bool = False) -> Tensor:
    """priors: list of B x K x H_i x W_i logits; image_size: padded (H, W). Returns B x K x H x W logits."""
    if not priors:
        raise ValueError("fuse_priors needs at least one prior map")
    height, width = image_size
    grid = (-(-height // FUSE_STRIDE), -(-width // FUSE_STRIDE))
    fused = sum(
        p if tuple(p.shape[-2:]) == grid else F.interpolate(p, size=grid, mode="bilinear", align_corners=align_corners)
        for p in priors
    )
    return F.interpolate(fused, size=(height, width), mode="bilinear", align_corners=align_corners)


def semantic_targets(targets: List[Dict[str, Tensor]], image_size: Tuple[int, int], ignore_value: int) -> Tensor:
    """Paint each target mask with its label: B x H x W int64, ``ignore_value`` where no mask covers a pixel.

    targets: per image {"labels": T, "masks": T x H' x W'} (H' <= H, W' <= W; the rest is padding).
    """
    height, width = image_size
    device = targets[0]["labels"].device if targets else torch.device("cpu")
    sem = torch.full((len(targets), height, width), ignore_value, dtype=torch.int64, device=device)
    for b, t in enumerate(targets):
        masks = t["masks"].bool()
        for label, mask in zip(t["labels"], masks):
            sem[b, : mask.shape[0], : mask.shape[1]][mask] = label
    return sem


def semask_prior_loss(fused_logits: Tensor, gt: Tensor, ignore_value: int = IGNORE_LABEL) -> Tensor:
    """Mean K-way CE of B x K x H x W logits against B x H x W labels over non-ignored pixels.

    Returns 0 (still connected to the logits) when every pixel is ignored, instead of NaN.
    """
    logits = fused_logits.float()
    total = F.cross_entropy(logits, gt, ignore_index=ignore_value, reduction="sum")
    num_valid = (gt != ignore_value).sum().clamp(min=1)
    return total / num_valid


def prior_loss_weight_from_config(cfg) -> float:
    """MODEL.SEMASK.PRIOR_LOSS_WEIGHT, or the official MODEL.MASK_FORMER.CATE_WEIGHT when that is set."""
    return float(
        resolve_compat_key(
            cfg, "MODEL.MASK_FORMER.CATE_WEIGHT", "MODEL.SEMASK.PRIOR_LOSS_WEIGHT", SEMASK_PRIOR_LOSS_WEIGHT_DEFAULT
        )
    )
