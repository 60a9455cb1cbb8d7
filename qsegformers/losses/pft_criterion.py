"""PFT's criterion: fixed query-to-class matching, sigmoid class losses, masks of present classes only,
and the cross-attention weight loss (spec: shared/specs/pft.md, section 3).

Loss terms of one output dict (unweighted; weights in ``weight_dict``, aux copies suffixed ``_<i>``):

* ``loss_ce``: BCE on the scale-averaged class logits, mean over B*K;
* ``loss_focal_ce``: sigmoid focal loss on each scale's class logits, mean over B*K, summed over scales;
* ``loss_mask`` / ``loss_dice``: focal and dice losses of the averaged mask logits of present classes;
* ``loss_attn``: cross-entropy between the head-averaged cross-attention of query k and the normalised
  GT mask of class k (uniform for absent classes, weighted by ``absent_weight``); only on outputs with
  ``attn_logits`` and only while ``iter < attn_loss_end_iter`` -- after that it is not computed and
  its key is absent from the loss dict.
"""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.utils.events import get_event_storage

from ..matching.fixed import FixedMatcher
from ..registries import CRITERION_REGISTRY
from .criterion import Indices, LossFn, expand_weight_dict
from .fixed_criterion import DEFAULT_NUM_POINTS, MASK_LOSS_SAMPLINGS, FixedMatchingCriterion
from .mask_losses import sigmoid_focal_loss

__all__ = ["PFTCriterion", "attention_targets", "pft_weight_dict"]

LOSS_KEYS = ("loss_ce", "loss_focal_ce", "loss_mask", "loss_dice", "loss_attn")
ATTN_LOSS_LAYERS = ("all", "last")
ATTN_TARGET_RESAMPLES = ("area", "nearest")


def pft_weight_dict(weights: Dict[str, float], num_aux: int) -> Dict[str, float]:
    """``weights`` (keys of LOSS_KEYS) plus ``<key>_<i>`` copies for ``num_aux`` auxiliary outputs."""
    return expand_weight_dict(weights, num_aux)


def attention_targets(
    masks: torch.Tensor, labels: torch.Tensor, num_classes: int, size, resample: str = "area"
) -> torch.Tensor:
    """Attention target of every class of one image on an h x w grid.

    Args:
        masks: T x H x W binary GT masks (ignored / padded pixels are 0).
        labels: T class ids (distinct).
        num_classes: K.
        size: (h, w) of the attention grid.
        resample: "area" (average pooling, small objects never vanish) or "nearest".

    Returns:
        K x (h*w) distributions: a present class gets its resampled mask normalised to sum 1 (uniform if
        nothing of it survives the resampling); an absent class gets the uniform 1 / (h*w).
    """
    h, w = size
    targets = masks.new_full((num_classes, h * w), 1.0 / (h * w), dtype=torch.float32)
    labels = labels.to(targets.device)
    if labels.numel():
        small = F.interpolate(masks[:, None].float(), size=(h, w), mode=resample).flatten(1)
        total = small.sum(-1, keepdim=True)
        present = torch.where(total > 0, small / total.clamp(min=torch.finfo(small.dtype).tiny), targets[labels])
        targets[labels] = present
    return targets


@CRITERION_REGISTRY.register()
class PFTCriterion(FixedMatchingCriterion):
    """Fixed-matching criterion of the Pyramid Fusion Transformer.

    Expected inputs of :meth:`forward`: the :class:`~qsegformers.decoders.pft.PyramidFusionTransformerDecoder`
    output dict (``pred_class_logits`` B x K, ``pred_class_logits_per_scale`` S x B x K, ``pred_masks``
    B x K x h x w, ``attn_logits`` per scale B x K x h_s x w_s or None, ``aux_outputs``) and B target dicts
    {"labels": T_b distinct class ids, "masks": T_b x H x W binary masks}.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        matcher: Optional[FixedMatcher] = None,
        weight_dict: Dict[str, float],
        deep_supervision: bool = True,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        mask_loss_sampling: str = "dense",
        num_points: int = DEFAULT_NUM_POINTS,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        absent_weight: float = 0.1,
        absent_uniform: bool = True,
        attn_loss_end_iter: Optional[int] = None,
        attn_loss_layers: str = "all",
        attn_target_resample: str = "area",
    ):
        """
        Args:
            num_classes: K (= queries per scale).
            matcher: a FixedMatcher (a new one when None); any other matcher is an error.
            weight_dict: loss name -> weight (see :func:`pft_weight_dict`).
            deep_supervision: also supervise ``outputs["aux_outputs"]``.
            focal_alpha, focal_gamma: of the class and mask focal losses.
            mask_loss_sampling: "dense" (every pixel at the target resolution) or "points"
                (Mask2Former's importance-sampled points).
            num_points, oversample_ratio, importance_sample_ratio: point sampling, for "points".
            absent_weight: weight omega of an absent class's attention term.
            absent_uniform: give absent classes the uniform attention target (False: no term).
            attn_loss_end_iter: the attention loss is computed while the iteration is below this
                (None: always).
            attn_loss_layers: "all" outputs with attention logits, or only the "last".
            attn_target_resample: "area" or "nearest" downsampling of the GT masks.
        """
        for value, choices, key in (
            (mask_loss_sampling, MASK_LOSS_SAMPLINGS, "MASK_LOSS_SAMPLING"),
            (attn_loss_layers, ATTN_LOSS_LAYERS, "ATTN_LOSS_LAYERS"),
            (attn_target_resample, ATTN_TARGET_RESAMPLES, "ATTN_TARGET_RESAMPLE"),
        ):
            if value not in choices:
                raise ValueError(f"MODEL.PFT.{key} must be one of {choices}, got {value!r}")
        super().__init__(
            num_classes,
            matcher=matcher,
            weight_dict=weight_dict,
            losses=["labels", "masks", "attn"],
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
            mask_loss_sampling=mask_loss_sampling,
            num_points=num_points,
            oversample_ratio=oversample_ratio,
            importance_sample_ratio=importance_sample_ratio,
            deep_supervision=deep_supervision,
        )
        self.absent_weight = absent_weight
        self.absent_uniform = absent_uniform
        self.attn_loss_end_iter = attn_loss_end_iter
        self.attn_loss_layers = attn_loss_layers
        self.attn_target_resample = attn_target_resample
        # Iteration used when no detectron2 EventStorage is active (tests, custom loops).
        self.cur_iter: Optional[int] = None

    @classmethod
    def from_config(cls, cfg, num_classes: int, matcher) -> "PFTCriterion":
        mf, pft = cfg.MODEL.MASK_FORMER, cfg.MODEL.PFT
        num_aux = mf.DEC_LAYERS - 1 if mf.DEEP_SUPERVISION else 0
        weights = dict(
            zip(
                LOSS_KEYS,
                (pft.CE_WEIGHT, pft.FOCAL_CE_WEIGHT, pft.MASK_FOCAL_WEIGHT, pft.DICE_WEIGHT, pft.ATTN_LOSS_WEIGHT),
            )
        )
        return cls(
            num_classes,
            matcher=matcher,
            weight_dict=pft_weight_dict(weights, num_aux),
            deep_supervision=mf.DEEP_SUPERVISION,
            focal_alpha=pft.FOCAL_ALPHA,
            focal_gamma=pft.FOCAL_GAMMA,
            mask_loss_sampling=pft.MASK_LOSS_SAMPLING,
            num_points=mf.TRAIN_NUM_POINTS,
            oversample_ratio=mf.OVERSAMPLE_RATIO,
            importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO,
            absent_weight=pft.ATTN_LOSS_ABSENT_WEIGHT,
            absent_uniform=pft.ATTN_LOSS_ABSENT_UNIFORM,
            attn_loss_end_iter=int(round(pft.ATTN_LOSS_END_FRACTION * cfg.SOLVER.MAX_ITER)),
            attn_loss_layers=pft.ATTN_LOSS_LAYERS,
            attn_target_resample=pft.ATTN_TARGET_RESAMPLE,
        )

    def term_functions(self) -> Dict[str, LossFn]:
        return {**super().term_functions(), "attn": self.loss_attn}

    # ------------------------------------------------------------------ schedule

    def current_iter(self) -> Optional[int]:
        """The trainer's iteration when an EventStorage is active, else ``self.cur_iter``."""
        try:
            return get_event_storage().iter
        except AssertionError:  # detectron2 asserts when no storage is active
            return self.cur_iter

    def attn_loss_active(self) -> bool:
        """True while the attention loss is on (iteration unknown counts as on)."""
        if self.attn_loss_end_iter is None:
            return True
        cur = self.current_iter()
        return cur is None or cur < self.attn_loss_end_iter

    # ------------------------------------------------------------------ loss terms

    @staticmethod
    def presence(targets: List[Dict], num_classes: int, like: torch.Tensor) -> torch.Tensor:
        """B x K {0, 1} targets: 1 where the class is among the image's labels."""
        present = torch.zeros(len(targets), num_classes, dtype=like.dtype, device=like.device)
        for b, t in enumerate(targets):
            present[b, t["labels"].to(like.device)] = 1.0
        return present

    def loss_labels(self, outputs: Dict, targets: List[Dict], indices: Indices, num_masks: float) -> Dict:
        """BCE on the averaged class logits and focal BCE on every scale's. Returns loss_ce, loss_focal_ce."""
        logits = outputs["pred_class_logits"].float()
        per_scale = outputs["pred_class_logits_per_scale"].float()
        present = self.presence(targets, self.num_classes, logits)
        batch = logits.shape[0]
        loss_focal = sum(
            sigmoid_focal_loss(z, present, batch, alpha=self.focal_alpha, gamma=self.focal_gamma) for z in per_scale
        )
        return {"loss_ce": F.binary_cross_entropy_with_logits(logits, present), "loss_focal_ce": loss_focal}

    def loss_attn(self, outputs: Dict, targets: List[Dict], indices: Indices, num_masks: float) -> Dict:
        """Attention-weight loss ``mean_b mean_s mean_k omega_k CE(t_{s,k}, softmax(a_{s,k}))``.

        Returns {"loss_attn": scalar}, or {} when the output has no attention logits or the loss is off.
        """
        attn_logits = outputs.get("attn_logits")
        if not attn_logits or not self.attn_loss_active():
            return {}
        per_scale = []
        for logits in attn_logits:
            size = tuple(logits.shape[-2:])
            log_w = logits.float().flatten(2).log_softmax(-1)  # B x K x (h*w)
            ce = []
            for b, t in enumerate(targets):
                target = attention_targets(t["masks"], t["labels"], self.num_classes, size, self.attn_target_resample)
                ce.append(-(target.to(log_w) * log_w[b]).sum(-1))
            ce = torch.stack(ce)  # B x K
            present = self.presence(targets, self.num_classes, ce)
            omega = present + (1 - present) * (self.absent_weight if self.absent_uniform else 0.0)
            per_scale.append((omega * ce).mean())
        return {"loss_attn": torch.stack(per_scale).mean()}

    # ------------------------------------------------------------------ entry point

    def aux_outputs_for_loss(self, aux_outputs: Dict) -> Dict:
        """With ``attn_loss_layers == "last"`` the attention loss applies to the final output only."""
        if self.attn_loss_layers == "last":
            return {k: v for k, v in aux_outputs.items() if k != "attn_logits"}
        return aux_outputs

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}, "
            f"mask_loss_sampling={self.mask_loss_sampling}, absent_weight={self.absent_weight}, "
            f"absent_uniform={self.absent_uniform}, attn_loss_end_iter={self.attn_loss_end_iter}, "
            f"attn_loss_layers={self.attn_loss_layers}, deep_supervision={self.deep_supervision}"
        )
