"""Tests of qsegformers/matching/hungarian.py and build.py."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg

from qsegformers.config import add_qsegformers_config
from qsegformers.losses.mask_losses import dice_loss, point_sample, sigmoid_ce_loss
from qsegformers.matching.build import build_matcher
from qsegformers.matching.hungarian import HungarianMatcher

NUM_CLASSES = 3
WEIGHTS = {"cost_class": 2.0, "cost_mask": 5.0, "cost_dice": 5.0}


def _block_masks(num, size, generator):
    """num binary masks, each a random rectangle, size x size."""
    masks = torch.zeros(num, size, size)
    for i in range(num):
        y0, x0 = torch.randint(0, size // 2, (2,), generator=generator).tolist()
        y1, x1 = torch.randint(size // 2 + 1, size + 1, (2,), generator=generator).tolist()
        masks[i, y0:y1, x0:x1] = 1
    return masks


def _dense_cost(logits, masks, labels, tgt_masks):
    """Q x T cost on full masks (same resolution), written as a loop over pairs."""
    cost = torch.zeros(masks.shape[0], tgt_masks.shape[0], dtype=torch.float64)
    probs = logits.softmax(-1)
    for q in range(masks.shape[0]):
        for t in range(tgt_masks.shape[0]):
            pred, tgt = masks[q : q + 1].flatten(1), tgt_masks[t : t + 1].flatten(1)
            cost[q, t] = (
                -WEIGHTS["cost_class"] * probs[q, labels[t]]
                + WEIGHTS["cost_mask"] * sigmoid_ce_loss(pred, tgt, 1)
                + WEIGHTS["cost_dice"] * dice_loss(pred, tgt, 1)
            )
    return cost


def _brute_force(cost):
    """Assignment of targets to distinct queries with minimum total cost: list of (q, t)."""
    num_queries, num_targets = cost.shape
    best = min(
        itertools.permutations(range(num_queries), num_targets),
        key=lambda qs: sum(cost[q, t].item() for t, q in enumerate(qs)),
    )
    return sorted(zip(best, range(num_targets)))


def _pairs(pred_idx, tgt_idx):
    return sorted(zip(pred_idx.tolist(), tgt_idx.tolist()))


def _case(seed, num_queries=4, num_targets=3, size=16, separation=4.0):
    """Predictions that are noisy copies of permuted targets (plus garbage queries)."""
    gen = torch.Generator().manual_seed(seed)
    tgt_masks = _block_masks(num_targets, size, gen)
    labels = torch.randint(0, NUM_CLASSES, (num_targets,), generator=gen)
    perm = torch.randperm(num_queries, generator=gen)
    masks = torch.randn(num_queries, size, size, generator=gen)
    for t in range(num_targets):
        masks[perm[t]] += separation * (2 * tgt_masks[t] - 1)
    logits = torch.randn(num_queries, NUM_CLASSES + 1, generator=gen)
    return logits, masks, labels, tgt_masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_full_masks(seed):
    logits, masks, labels, tgt_masks = _case(seed)
    matcher = HungarianMatcher(**WEIGHTS, num_points=64 * 64)
    outputs = {"pred_logits": logits[None], "pred_masks": masks[None]}
    [(pred_idx, tgt_idx)] = matcher(outputs, [{"labels": labels, "masks": tgt_masks}])
    expected = _brute_force(_dense_cost(logits.double(), masks.double(), labels, tgt_masks.double()))
    assert _pairs(pred_idx, tgt_idx) == expected


@pytest.mark.parametrize("seed", range(4))
def test_assignment_is_optimal_for_its_own_cost(seed):
    """With the matcher's sampled points reproduced, its assignment minimises the total cost."""
    logits, masks, labels, tgt_masks = _case(seed, separation=0.5)
    matcher = HungarianMatcher(**WEIGHTS, num_points=50)
    torch.manual_seed(seed)
    [(pred_idx, tgt_idx)] = matcher(
        {"pred_logits": logits[None], "pred_masks": masks[None]}, [{"labels": labels, "masks": tgt_masks}]
    )
    torch.manual_seed(seed)
    cost = matcher.cost_matrix(logits, masks, labels, tgt_masks)
    got = sum(cost[q, t].item() for q, t in zip(pred_idx.tolist(), tgt_idx.tolist()))
    best = sum(cost[q, t].item() for q, t in _brute_force(cost))
    assert got == pytest.approx(best)
    assert pred_idx.dtype == tgt_idx.dtype == torch.int64
    assert len(pred_idx) == len(tgt_idx) == 3


def test_cost_matrix_uses_the_same_points_for_predictions_and_targets():
    logits, masks, labels, _ = _case(5, size=8)
    tgt_masks = (torch.rand(3, 20, 12) > 0.5).to(torch.uint8)  # other size and dtype
    matcher = HungarianMatcher(**WEIGHTS, num_points=40)
    torch.manual_seed(7)
    cost = matcher.cost_matrix(logits, masks, labels, tgt_masks)
    torch.manual_seed(7)
    coords = torch.rand(1, 40, 2)
    pred_pts = point_sample(masks[:, None], coords.expand(4, -1, -1), align_corners=False)[:, 0]
    tgt_pts = point_sample(tgt_masks[:, None].float(), coords.expand(3, -1, -1), align_corners=False)[:, 0]
    probs = logits.softmax(-1)
    for q in range(4):
        for t in range(3):
            expected = (
                -WEIGHTS["cost_class"] * probs[q, labels[t]]
                + WEIGHTS["cost_mask"] * sigmoid_ce_loss(pred_pts[q : q + 1], tgt_pts[t : t + 1], 1)
                + WEIGHTS["cost_dice"] * dice_loss(pred_pts[q : q + 1], tgt_pts[t : t + 1], 1)
            )
            torch.testing.assert_close(cost[q, t], expected)


def test_mismatched_resolutions_recover_the_permutation():
    """Targets at 4x the prediction resolution still match the query that predicts them."""
    gen = torch.Generator().manual_seed(0)
    low = torch.zeros(3, 8, 8)
    low[0, :4, :4] = low[1, 4:, :] = low[2, :4, 4:] = 1
    high = F.interpolate(low[None], scale_factor=4, mode="nearest")[0]
    perm = [2, 0, 3]  # query of target t
    masks = torch.randn(4, 8, 8, generator=gen)
    for t, q in enumerate(perm):
        masks[q] = 8 * (2 * low[t] - 1)
    logits = torch.zeros(2, 4, NUM_CLASSES + 1)
    labels = torch.tensor([1, 1, 1])
    targets = [{"labels": labels, "masks": high}, {"labels": labels[:2], "masks": high[:2, :20, :24]}]
    matcher = HungarianMatcher(**WEIGHTS, num_points=500)
    indices = matcher({"pred_logits": logits, "pred_masks": masks[None].repeat(2, 1, 1, 1)}, targets)
    assert _pairs(*indices[0]) == sorted((q, t) for t, q in enumerate(perm))
    assert len(indices[1][0]) == 2


def test_images_without_targets():
    logits, masks, labels, tgt_masks = _case(0)
    outputs = {"pred_logits": logits[None].repeat(2, 1, 1), "pred_masks": masks[None].repeat(2, 1, 1, 1)}
    targets = [{"labels": labels[:0], "masks": tgt_masks[:0]}, {"labels": labels, "masks": tgt_masks}]
    indices = HungarianMatcher(**WEIGHTS, num_points=32)(outputs, targets)
    assert [len(i) for i, _ in indices] == [0, 3]
    assert indices[0][0].dtype == indices[0][1].dtype == torch.int64


def test_class_cost_is_overridable_for_sigmoid_heads():
    class SigmoidMatcher(HungarianMatcher):
        def class_cost(self, logits, labels):
            return -logits.sigmoid()[:, labels]

    masks = torch.zeros(1, 3, 4, 4)
    logits = torch.full((1, 3, NUM_CLASSES), -5.0)  # K columns, no no-object
    logits[0, 2, 1] = 5.0
    labels = torch.tensor([1])
    matcher = SigmoidMatcher(cost_class=1.0, cost_mask=0.0, cost_dice=0.0, num_points=8)
    outputs = {"pred_logits": logits, "pred_masks": masks}
    [(pred_idx, tgt_idx)] = matcher(outputs, [{"labels": labels, "masks": masks[0, :1]}])
    assert pred_idx.tolist() == [2] and tgt_idx.tolist() == [0]


def test_forward_does_not_track_gradients():
    logits, masks, labels, tgt_masks = _case(0)
    logits.requires_grad_(True)
    matcher = HungarianMatcher(**WEIGHTS, num_points=16)
    matcher({"pred_logits": logits[None], "pred_masks": masks[None]}, [{"labels": labels, "masks": tgt_masks}])
    assert logits.grad is None


def test_invalid_arguments():
    with pytest.raises(ValueError, match="TRAIN_NUM_POINTS"):
        HungarianMatcher(**WEIGHTS, num_points=0)
    with pytest.raises(ValueError, match="all costs are 0"):
        HungarianMatcher(cost_class=0, cost_mask=0, cost_dice=0, num_points=4)
    matcher = HungarianMatcher(**WEIGHTS, num_points=4)
    logits, masks, labels, tgt_masks = _case(0)
    with pytest.raises(ValueError, match="targets"):
        matcher({"pred_logits": logits[None], "pred_masks": masks[None]}, [])
    with pytest.raises(FloatingPointError, match="NaN"):
        matcher(
            {"pred_logits": logits[None] * float("nan"), "pred_masks": masks[None]},
            [{"labels": labels, "masks": tgt_masks}],
        )


def test_build_matcher_from_config():
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.MODEL.MASK_FORMER.CLASS_WEIGHT = 2.0
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 99
    matcher = build_matcher(cfg, "HungarianMatcher")
    assert isinstance(matcher, HungarianMatcher)
    assert (matcher.cost_class, matcher.cost_mask, matcher.cost_dice, matcher.num_points) == (
        2.0,
        cfg.MODEL.MASK_FORMER.MASK_WEIGHT,
        cfg.MODEL.MASK_FORMER.DICE_WEIGHT,
        99,
    )
    with pytest.raises(KeyError, match="MODEL.MASK_FORMER.MATCHER_NAME"):
        build_matcher(cfg, "NoSuchMatcher")
