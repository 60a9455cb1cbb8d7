"""Set criterion of Mask2Former: match queries to targets, then supervise the matched pairs.

``SetCriterion.forward`` returns *unweighted* losses; :meth:`SetCriterion.weighted` applies the
weight dict. Loss terms are looked up by name in ``self.loss_fns``, so a subclass adds a term by
adding a method and registering it in that mapping, and a method with its own assignment
(fixed matching, denoising slots) calls :meth:`SetCriterion.compute_losses` with its own indices.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.utils import comm
from torch import nn

from ..registries import CRITERION_REGISTRY

from .mask_losses import (
    calculate_uncertainty,
    dice_loss,
    get_uncertain_point_coords_with_randomness,
    point_sample,
    sigmoid_ce_loss,
)

__all__ = ["SetCriterion", "build_weight_dict", "expand_weight_dict"]

Indices = List[Tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[Dict, List[Dict], Indices, float], Dict[str, torch.Tensor]]

# Keys of the per-output loss terms of the baseline, in the order of their weights.
BASE_LOSS_KEYS = ("loss_ce", "loss_mask", "loss_dice")


def expand_weight_dict(weights: Dict[str, float], num_aux: int) -> Dict[str, float]:
    """``weights`` (loss key -> weight) plus ``<key>_<i>`` copies for ``num_aux`` auxiliary outputs: the one
    weight-dict builder of every criterion."""
    weight_dict = dict(weights)
    for i in range(num_aux):
        weight_dict.update({f"{k}_{i}": w for k, w in weights.items()})
    return weight_dict


def build_weight_dict(
    class_weight: float, mask_weight: float, dice_weight: float, dec_layers: int, deep_supervision: bool
) -> Dict[str, float]:
    """Loss weights of the baseline: loss_ce/loss_mask/loss_dice, plus ``<key>_<i>`` copies for
    the ``dec_layers - 1`` auxiliary outputs when ``deep_supervision``."""
    base = dict(zip(BASE_LOSS_KEYS, (class_weight, mask_weight, dice_weight)))
    return expand_weight_dict(base, dec_layers - 1 if deep_supervision else 0)


@CRITERION_REGISTRY.register()
class SetCriterion(nn.Module):
    """Hungarian-matched classification and point-sampled mask losses (Mask2Former).

    Expected inputs of :meth:`forward`:
        outputs: {"pred_logits": B x Q x (K+1), "pred_masks": B x Q x H x W mask logits,
                  optional "aux_outputs": list of dicts with the same two keys, ...}
        targets: B dicts {"labels": T_b int64 in [0, K), "masks": T_b x H' x W' binary masks}.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        eos_coef: float,
        losses: Sequence[str],
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        *,
        deep_supervision: bool = True,
    ):
        """
        Args:
            num_classes: K, number of real classes (the no-object class is index K).
            matcher: callable (outputs, targets) -> list of (pred_idx, tgt_idx) per image.
            weight_dict: loss name -> weight, used by :meth:`weighted`.
            eos_coef: CE weight of the no-object class.
            losses: names of the terms to compute, keys of ``self.loss_fns`` (e.g. ["labels", "masks"]).
            num_points: points sampled per matched mask for the mask losses.
            oversample_ratio: PointRend oversampling factor (>= 1).
            importance_sample_ratio: fraction of the points chosen by uncertainty.
            deep_supervision: also supervise ``outputs["aux_outputs"]`` (keys suffixed ``_<i>``).
        """
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        # Part of the official state dict as ``criterion.empty_weight``: keep the name.
        self.register_buffer("empty_weight", empty_weight)

        self.loss_fns: Dict[str, LossFn] = self.term_functions()
        unknown = [name for name in losses if name not in self.loss_fns]
        if unknown:
            raise KeyError(f"{type(self).__name__}: unknown loss names {unknown}; known: {sorted(self.loss_fns)}")
        self.losses = list(losses)

    def term_functions(self) -> Dict[str, LossFn]:
        """Loss-term name -> function; a subclass adds its terms by extending this mapping."""
        return {"labels": self.loss_labels, "masks": self.loss_masks}

    @classmethod
    def config_kwargs(cls, cfg, num_classes: int, matcher: nn.Module) -> Dict:
        """Mask2Former's constructor arguments from ``MODEL.MASK_FORMER.*`` (weights, points, deep
        supervision); a subclass extends this dict instead of repeating it."""
        mf = cfg.MODEL.MASK_FORMER
        weight_dict = build_weight_dict(
            class_weight=mf.CLASS_WEIGHT,
            mask_weight=mf.MASK_WEIGHT,
            dice_weight=mf.DICE_WEIGHT,
            dec_layers=mf.DEC_LAYERS,
            deep_supervision=mf.DEEP_SUPERVISION,
        )
        return {
            "num_classes": num_classes,
            "matcher": matcher,
            "weight_dict": weight_dict,
            "eos_coef": mf.NO_OBJECT_WEIGHT,
            "losses": ["labels", "masks"],
            "num_points": mf.TRAIN_NUM_POINTS,
            "oversample_ratio": mf.OVERSAMPLE_RATIO,
            "importance_sample_ratio": mf.IMPORTANCE_SAMPLE_RATIO,
            "deep_supervision": mf.DEEP_SUPERVISION,
        }

    @classmethod
    def from_config(cls, cfg, num_classes: int, matcher: nn.Module) -> "SetCriterion":
        """The criterion built from :meth:`config_kwargs`."""
        return cls(**cls.config_kwargs(cfg, num_classes, matcher))

    # ------------------------------------------------------------------ loss terms

    def loss_labels(
        self, outputs: Dict, targets: List[Dict], indices: Indices, num_masks: float
    ) -> Dict[str, torch.Tensor]:
        """Cross-entropy over K+1 classes; unmatched queries are supervised as no-object (K).

        Returns {"loss_ce": scalar}.
        """
        logits = outputs["pred_logits"]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        batch_idx, src_idx = self._src_permutation_idx(indices)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, src_idx] = torch.cat(
            [t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)]
        ).to(device=logits.device, dtype=torch.int64)
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits.dtype))
        return {"loss_ce": loss_ce}

    def loss_masks(
        self, outputs: Dict, targets: List[Dict], indices: Indices, num_masks: float
    ) -> Dict[str, torch.Tensor]:
        """Sigmoid BCE and dice between matched masks on importance-sampled points.

        The points are chosen from the uncertainty of each matched predicted mask, and the target
        mask is sampled at the same normalised points, so the resolutions may differ.

        Returns {"loss_mask": scalar, "loss_dice": scalar}.
        """
        pred_masks = outputs["pred_masks"]
        batch_idx, src_idx = self._src_permutation_idx(indices)
        if batch_idx.numel() == 0:
            # Keep the graph connected (DDP expects every parameter to get a gradient).
            zero = pred_masks.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        src_masks = pred_masks[batch_idx, src_idx][:, None]
        target_masks = self._matched_target_masks(targets, indices).to(src_masks)[:, None]

        with torch.no_grad():
            point_coords = get_uncertain_point_coords_with_randomness(
                src_masks,
                calculate_uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
            point_labels = point_sample(target_masks, point_coords, align_corners=False).squeeze(1)
        point_logits = point_sample(src_masks, point_coords, align_corners=False).squeeze(1)
        return {
            "loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks),
        }

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _src_permutation_idx(indices: Indices) -> Tuple[torch.Tensor, torch.Tensor]:
        """(batch index, query index) of every matched prediction, each of length sum_b T_b."""
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    @staticmethod
    def _matched_target_masks(targets: List[Dict], indices: Indices) -> torch.Tensor:
        """Target masks in matched order, zero-padded (bottom/right) to the largest H' x W'.

        Returns N x H'max x W'max, N = number of matched pairs.
        """
        height = max(t["masks"].shape[-2] for t in targets)
        width = max(t["masks"].shape[-1] for t in targets)
        matched = []
        for t, (_, tgt) in zip(targets, indices):
            masks = t["masks"][tgt.to(t["masks"].device)]
            pad = (0, width - masks.shape[-1], 0, height - masks.shape[-2])
            matched.append(F.pad(masks, pad) if any(pad) else masks)
        return torch.cat(matched)

    def get_num_masks(self, targets: List[Dict], device: torch.device) -> float:
        """Total number of target masks, averaged over distributed ranks, at least 1."""
        num_masks = torch.as_tensor(
            [float(sum(len(t["labels"]) for t in targets))], dtype=torch.float32, device=device
        )
        world_size = comm.get_world_size()
        if world_size > 1:
            torch.distributed.all_reduce(num_masks)
        return torch.clamp(num_masks / world_size, min=1).item()

    def match(self, outputs: Dict, targets: List[Dict]) -> Indices:
        """Assignment of one output dict; override for fixed (non-Hungarian) assignments."""
        return self.matcher(outputs, targets)

    def compute_losses(
        self,
        outputs: Dict,
        targets: List[Dict],
        indices: Indices,
        num_masks: float,
        suffix: str = "",
        names: Optional[Sequence[str]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Every term in ``names`` (default ``self.losses``) for one output dict and a given assignment,
        keys + suffix."""
        losses = {}
        for name in self.losses if names is None else names:
            for key, value in self.loss_fns[name](outputs, targets, indices, num_masks).items():
                losses[key + suffix] = value
        return losses

    # ------------------------------------------------------------------ entry points

    # True when the assignment does not depend on the predictions (query k = class k): it is then
    # computed once and shared by every output instead of being matched per output.
    assignment_is_fixed = False

    def aux_outputs_for_loss(self, aux_outputs: Dict) -> Dict:
        """The entries of one auxiliary output that are supervised (all of them by default)."""
        return aux_outputs

    def forward(self, outputs: Dict, targets: List[Dict]) -> Dict[str, torch.Tensor]:
        """Unweighted losses of the final output and, with deep supervision, of every aux output.

        Returns:
            {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", ...}: scalar tensors.
        """
        main_outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        num_masks = self.get_num_masks(targets, outputs["pred_masks"].device)
        indices = self.match(main_outputs, targets)
        losses = self.compute_losses(main_outputs, targets, indices, num_masks)
        if self.deep_supervision:
            for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
                aux_indices = indices if self.assignment_is_fixed else self.match(aux_outputs, targets)
                aux_outputs = self.aux_outputs_for_loss(aux_outputs)
                losses.update(self.compute_losses(aux_outputs, targets, aux_indices, num_masks, suffix=f"_{i}"))
        return losses

    def weighted(self, losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Multiply each loss by its weight; a loss without a weight is an error, not dropped."""
        missing = [k for k in losses if k not in self.weight_dict]
        if missing:
            raise KeyError(
                f"SetCriterion: losses {missing} have no entry in weight_dict "
                f"(known: {sorted(self.weight_dict)}); add a weight or stop computing the term"
            )
        return {k: v * self.weight_dict[k] for k, v in losses.items()}

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, losses={self.losses}, eos_coef={self.eos_coef}, "
            f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}, deep_supervision={self.deep_supervision}"
        )
