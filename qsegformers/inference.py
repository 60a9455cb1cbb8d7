"""Post-processing of one image's query predictions into semantic, panoptic and instance outputs.

Two class activations are supported, named by the decoder:

* ``"softmax"``: ``mask_cls`` has K+1 columns, the last one is "no object";
* ``"sigmoid"``: ``mask_cls`` has K columns, one independent "class is present" logit each.

All functions take one image: ``mask_cls`` Q x C class logits and ``mask_pred`` Q x H x W mask
logits (already resized to the output resolution by the caller).
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks, Boxes, Instances

__all__ = [
    "ACTIVATIONS",
    "class_probs",
    "semantic_inference",
    "panoptic_inference",
    "instance_inference",
    "QueryPostprocessing",
]

ACTIVATIONS = ("softmax", "sigmoid")

# A pixel belongs to a query's mask when its mask probability reaches this value.
MASK_PROB_THRESHOLD = 0.5
# Keeps the mean mask probability of an empty binary mask finite.
EMPTY_MASK_EPS = 1e-6


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown class activation {activation!r}; expected one of {ACTIVATIONS}")


def _check_num_columns(mask_cls: torch.Tensor, num_classes: int, activation: str) -> None:
    expected = num_classes + 1 if activation == "softmax" else num_classes
    if mask_cls.shape[-1] != expected:
        raise ValueError(
            f"{activation} head with num_classes={num_classes} needs {expected} class columns, "
            f"got mask_cls of shape {tuple(mask_cls.shape)}"
        )


def class_probs(mask_cls: torch.Tensor, activation: str) -> torch.Tensor:
    """Per-class probabilities of each query, without the no-object column.

    Args:
        mask_cls: Q x (K+1) logits for "softmax", Q x K logits for "sigmoid".
        activation: "softmax" or "sigmoid".

    Returns:
        Q x K probabilities.
    """
    _check_activation(activation)
    if activation == "softmax":
        return F.softmax(mask_cls, dim=-1)[..., :-1]
    return mask_cls.sigmoid()


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor, activation: str = "softmax") -> torch.Tensor:
    """Per-class score maps ``sum_q p_q[c] * sigmoid(m_q)``.

    Args:
        mask_cls: Q x C class logits (C = K+1 for softmax, K for sigmoid).
        mask_pred: Q x H x W mask logits.
        activation: "softmax" or "sigmoid".

    Returns:
        K x H x W scores (argmax over dim 0 is the semantic segmentation).
    """
    return torch.einsum("qc,qhw->chw", class_probs(mask_cls, activation), mask_pred.sigmoid())


def _query_scores_labels(
    mask_cls: torch.Tensor, num_classes: int, activation: str
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best class of each query: (scores Q, labels Q int64, is_object Q bool)."""
    if activation == "softmax":
        scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
        return scores, labels, labels.ne(num_classes)
    scores, labels = mask_cls.sigmoid().max(-1)
    return scores, labels, torch.ones_like(labels, dtype=torch.bool)


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    *,
    num_classes: int,
    object_mask_threshold: float,
    overlap_threshold: float,
    thing_ids: Set[int],
    activation: str = "softmax",
) -> Tuple[torch.Tensor, List[Dict]]:
    """Non-overlapping segments from the confident queries.

    Queries whose best class is a real class with score > ``object_mask_threshold`` compete for
    each pixel by ``score * mask probability``. A query keeps a segment only if its own mask
    (probability >= 0.5), the pixels it wins, and their intersection are all non-empty and the
    pixels it wins cover at least ``overlap_threshold`` of its own mask. All stuff queries of
    one class share a single segment.

    Args:
        mask_cls: Q x C class logits.
        mask_pred: Q x H x W mask logits.
        num_classes: K.
        object_mask_threshold: minimum class score of a kept query.
        overlap_threshold: minimum (won area / own mask area) of a kept query.
        thing_ids: contiguous class ids that are things; every other class is stuff.
        activation: "softmax" or "sigmoid".

    Returns:
        panoptic_seg: H x W int32 segment ids, 0 = void, segments numbered from 1.
        segments_info: one {"id": int, "isthing": bool, "category_id": int} per segment.
    """
    _check_activation(activation)
    _check_num_columns(mask_cls, num_classes, activation)
    scores, labels, is_object = _query_scores_labels(mask_cls, num_classes, activation)
    keep = is_object & (scores > object_mask_threshold)
    cur_scores = scores[keep]
    cur_classes = labels[keep]
    cur_masks = mask_pred.sigmoid()[keep]

    height, width = mask_pred.shape[-2:]
    panoptic_seg = torch.zeros((height, width), dtype=torch.int32, device=mask_pred.device)
    segments_info: List[Dict] = []
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments_info

    winner = (cur_scores[:, None, None] * cur_masks).argmax(0)
    stuff_segment_of_class: Dict[int, int] = {}
    for k in range(cur_classes.shape[0]):
        category_id = int(cur_classes[k].item())
        isthing = category_id in thing_ids
        won = winner == k
        own = cur_masks[k] >= MASK_PROB_THRESHOLD
        segment = won & own
        won_area, own_area = int(won.sum().item()), int(own.sum().item())
        if won_area == 0 or own_area == 0 or not segment.any():
            continue
        if won_area / own_area < overlap_threshold:
            continue
        if not isthing and category_id in stuff_segment_of_class:
            panoptic_seg[segment] = stuff_segment_of_class[category_id]
            continue
        segment_id = len(segments_info) + 1
        panoptic_seg[segment] = segment_id
        segments_info.append({"id": segment_id, "isthing": bool(isthing), "category_id": category_id})
        if not isthing:
            stuff_segment_of_class[category_id] = segment_id
    return panoptic_seg, segments_info


def instance_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    *,
    num_classes: int,
    topk: int,
    thing_ids: Optional[Set[int]] = None,
    activation: str = "softmax",
) -> Instances:
    """The ``topk`` best (query, class) pairs as instances.

    Args:
        mask_cls: Q x C class logits.
        mask_pred: Q x H x W mask logits.
        num_classes: K.
        topk: number of (query, class) pairs kept (at most Q * K), sorted by class score.
        thing_ids: when given (panoptic datasets), pairs whose class is not a thing are dropped
            after the top-k selection.
        activation: "softmax" or "sigmoid".

    Returns:
        Instances of image_size H x W with fields ``pred_masks`` (N x H x W float {0, 1}),
        ``pred_boxes`` (Boxes of the binary masks; all zeros for an empty mask), ``scores``
        (class score x mean mask probability inside the binary mask) and ``pred_classes``
        (N int64), N <= topk.
    """
    _check_activation(activation)
    _check_num_columns(mask_cls, num_classes, activation)
    num_queries = mask_cls.shape[0]
    scores = class_probs(mask_cls, activation)  # Q x K
    labels = torch.arange(num_classes, device=mask_cls.device).repeat(num_queries)
    class_scores, flat_idx = scores.flatten().topk(min(topk, scores.numel()), sorted=True)
    pred_classes = labels[flat_idx]
    query_idx = torch.div(flat_idx, num_classes, rounding_mode="floor")
    if thing_ids is not None:
        is_thing = torch.tensor(
            [int(c) in thing_ids for c in pred_classes.tolist()], dtype=torch.bool, device=mask_cls.device
        )
        class_scores, pred_classes, query_idx = class_scores[is_thing], pred_classes[is_thing], query_idx[is_thing]
    logits = mask_pred[query_idx]

    result = Instances(tuple(mask_pred.shape[-2:]))
    binary = logits > 0
    result.pred_masks = binary.float()
    result.pred_boxes = Boxes(BitMasks(binary).get_bounding_boxes().tensor.to(mask_pred.device))
    mask_scores = (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + EMPTY_MASK_EPS)
    result.scores = class_scores * mask_scores
    result.pred_classes = pred_classes
    return result


@dataclass(frozen=True)
class QueryPostprocessing:
    """The inference settings of one model, applied to one image's query predictions.

    The meta-architecture builds it from its config; test-time augmentation reuses it on the
    queries pooled over augmentations, so both paths post-process with the same settings.
    """

    num_classes: int
    activation: str = "softmax"
    object_mask_threshold: float = 0.0
    overlap_threshold: float = 0.0
    thing_ids: Set[int] = field(default_factory=set)
    topk: int = 100
    panoptic_on: bool = False
    # Query k scores only class k (its other class probabilities are exactly 0, e.g. PFT's sigmoid head):
    # the semantic scores are then p_k[k] * sigmoid(m_k), without the Q x K x H x W sum.
    queries_are_classes: bool = False

    def semantic(self, mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
        """K x H x W scores (see :func:`semantic_inference`)."""
        if self.queries_are_classes:
            probs = class_probs(mask_cls, self.activation)
            if probs.shape[0] != probs.shape[1]:
                raise ValueError(f"queries_are_classes needs Q == K, got class probabilities {tuple(probs.shape)}")
            return probs.diagonal()[:, None, None] * mask_pred.sigmoid()
        return semantic_inference(mask_cls, mask_pred, activation=self.activation)

    def panoptic(self, mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> Tuple[torch.Tensor, List[Dict]]:
        """(H x W segment ids, segments_info) (see :func:`panoptic_inference`)."""
        return panoptic_inference(
            mask_cls,
            mask_pred,
            num_classes=self.num_classes,
            object_mask_threshold=self.object_mask_threshold,
            overlap_threshold=self.overlap_threshold,
            thing_ids=self.thing_ids,
            activation=self.activation,
        )

    def instances(self, mask_cls: torch.Tensor, mask_pred: torch.Tensor, topk: Optional[int] = None) -> Instances:
        """Top-k instances (see :func:`instance_inference`); on a panoptic dataset only thing classes."""
        return instance_inference(
            mask_cls,
            mask_pred,
            num_classes=self.num_classes,
            topk=self.topk if topk is None else topk,
            thing_ids=self.thing_ids if self.panoptic_on else None,
            activation=self.activation,
        )
