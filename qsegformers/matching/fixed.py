"""Fixed query-to-class assignment (PFT): query k always stands for class k.

Semantic targets carry one mask per present class, so the assignment of an image is simply "each
present class c goes to query c"; no cost is computed and no Hungarian matching is run.
"""
from typing import Dict, List, Tuple

import torch
from detectron2.config import configurable
from torch import nn

from ..registries import MATCHER_REGISTRY

__all__ = ["FixedMatcher"]


@MATCHER_REGISTRY.register()
class FixedMatcher(nn.Module):
    """Assign target ``t`` (class ``labels[t]``) to query ``labels[t]``."""

    @configurable
    def __init__(self):
        super().__init__()

    @classmethod
    def from_config(cls, cfg):
        return {}

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            outputs: {"pred_masks": B x Q x H x W, ...}; only Q (queries = classes) is read.
            targets: B dicts {"labels": T_b int64 class ids, one target per class}.

        Returns:
            B pairs (pred_idx, tgt_idx) of int64 CPU tensors of length T_b: the present class ids in
            increasing order, and the index of the target holding each of them.
        """
        num_queries = outputs["pred_masks"].shape[1]
        if len(targets) != outputs["pred_masks"].shape[0]:
            raise ValueError(f"FixedMatcher: {outputs['pred_masks'].shape[0]} predictions but {len(targets)} targets")
        indices = []
        for b, target in enumerate(targets):
            labels = target["labels"].detach().to("cpu", torch.int64)
            if labels.numel() and (labels.min() < 0 or labels.max() >= num_queries):
                raise ValueError(
                    f"FixedMatcher: image {b} has target classes {labels.tolist()}, but query k stands for class k "
                    f"and there are {num_queries} queries (classes 0..{num_queries - 1})."
                )
            if labels.unique().numel() != labels.numel():
                raise ValueError(
                    f"FixedMatcher: image {b} has a class more than once among its targets {labels.tolist()}; "
                    "fixed matching needs semantic targets (one mask per class)."
                )
            pred_idx, tgt_idx = labels.sort()
            indices.append((pred_idx, tgt_idx))
        return indices
