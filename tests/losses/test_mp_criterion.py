"""MPCriterion: hard assignment of MP slots to their GT, MP loss keys / weights / normaliser, padding slots."""
import math

import pytest
import torch
from detectron2.config import get_cfg
from torch import nn

from qsegformers import add_qsegformers_config
from qsegformers.losses.criterion import build_weight_dict
from qsegformers.losses.mp_criterion import MPCriterion, hard_assignment, mp_weight_dict
from qsegformers.matching.hungarian import HungarianMatcher

K, N, S = 3, 4, 16  # classes, matching queries, mask size
LOGIT = 20.0


class RecordingMatcher(nn.Module):
    """Matches query i to target i and records the query count of every call."""

    def __init__(self):
        super().__init__()
        self.query_counts = []

    def forward(self, outputs, targets):
        self.query_counts.append(outputs["pred_logits"].shape[1])
        return [(torch.arange(len(t["labels"])), torch.arange(len(t["labels"]))) for t in targets]


def make_criterion(matcher=None, dec_layers=3, **mp_args):
    weights = build_weight_dict(2.0, 5.0, 5.0, dec_layers, True)
    weights.update(mp_weight_dict(2.0, 5.0, 5.0, dec_layers, True))
    return MPCriterion(
        K, matcher or RecordingMatcher(), weights, 0.1, ["labels", "masks"], 256, 3.0, 0.0, **mp_args
    )


def targets():
    """Image 0: segments 0 (left half, class 2) and 1 (bottom-right square, class 0); image 1: one (class 1)."""
    m0 = torch.zeros(2, S, S, dtype=torch.bool)
    m0[0, :, :8] = True
    m0[1, 10:, 10:] = True
    m1 = torch.zeros(1, S, S, dtype=torch.bool)
    m1[0, 2:9, 3:12] = True
    return [{"labels": torch.tensor([2, 0]), "masks": m0}, {"labels": torch.tensor([1]), "masks": m1}]


def prediction(logits, masks):
    return {"pred_logits": logits, "pred_masks": masks}


def perfect_mp_outputs(num_groups, num_aux=2):
    """MP predictions (T_max = 2) that exactly match slot g*2 + j <-> GT j; padding slots say no-object."""
    tg = targets()
    p = num_groups * 2
    logits = torch.full((2, p, K + 1), -LOGIT)
    masks = torch.full((2, p, S, S), -LOGIT)
    for b, t in enumerate(tg):
        for s in range(p):
            j = s % 2
            if j < len(t["labels"]):
                logits[b, s, t["labels"][j]] = LOGIT
                masks[b, s][t["masks"][j]] = LOGIT
            else:
                logits[b, s, K] = LOGIT
    out = prediction(logits, masks)
    out["aux_outputs"] = [prediction(logits.clone(), masks.clone()) for _ in range(num_aux)]
    out.update(num_groups=num_groups, max_targets=2)
    return out


def matching_outputs(num_aux=2):
    torch.manual_seed(0)
    out = prediction(torch.randn(2, N, K + 1), torch.randn(2, N, S, S))
    out["aux_outputs"] = [prediction(torch.randn(2, N, K + 1), torch.randn(2, N, S, S)) for _ in range(num_aux)]
    return out


def mp_losses(losses):
    return {k: v for k, v in losses.items() if "_mp" in k}


def test_hard_assignment_maps_slot_to_its_segment():
    got = hard_assignment(2, 3, [3, 1, 0])
    expected = [([0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2]), ([0, 3], [0, 0]), ([], [])]
    assert [(s.tolist(), t.tolist()) for s, t in got] == expected


def test_mp_slot_i_is_supervised_by_segment_i_without_matching():
    """Perfect slot predictions give ~0 class loss and small mask losses (bilinear point sampling blurs the
    mask edges); swapping the predictions of slots 0 and 1 of image 0 multiplies them."""
    matcher = RecordingMatcher()
    criterion = make_criterion(matcher)
    outputs = matching_outputs()
    outputs["mp_outputs"] = perfect_mp_outputs(num_groups=2)
    perfect = mp_losses(criterion(outputs, targets()))
    assert len(perfect) == 9 and perfect["loss_ce_mp"] < 1e-3 and perfect["loss_ce_mp_1"] < 1e-3
    # the matcher only ever saw the N matching queries, once per prediction
    assert matcher.query_counts == [N, N, N]
    swapped = perfect_mp_outputs(num_groups=2)
    for pred in [swapped] + swapped["aux_outputs"]:
        for key in ("pred_logits", "pred_masks"):
            pred[key][0, [0, 1]] = pred[key][0, [1, 0]]
    outputs["mp_outputs"] = swapped
    swapped_losses = mp_losses(criterion(outputs, targets()))
    assert swapped_losses["loss_ce_mp"] > 1.0
    for key in ("loss_mask_mp", "loss_dice_mp", "loss_mask_mp_0", "loss_dice_mp_1"):
        assert swapped_losses[key] > 5 * perfect[key]


def test_padding_slots_get_no_object_target_and_no_mask_loss():
    """Logits favouring no-object (10 vs 0): CE = weighted mean of log(e^10 + K) - [pad] 10, pad weight 0.1.
    Mask logits 0: BCE log 2 on every real slot's points, / (num_masks * G) -> log 2 whatever the padding."""
    criterion = make_criterion(deep_supervision=False)
    groups = 3
    logits = torch.zeros(2, 2 * groups, K + 1)
    logits[..., K] = 10.0
    masks = torch.zeros(2, 2 * groups, S, S)
    masks[1, 1::2] = torch.randn(groups, S, S) * 50  # padding slots of image 1: arbitrary masks
    outputs = matching_outputs(num_aux=0)
    outputs["mp_outputs"] = {"pred_logits": logits, "pred_masks": masks, "num_groups": groups, "max_targets": 2}
    losses = criterion(outputs, targets())
    n_real, n_pad = 3 * groups, 1 * groups
    ce_real = math.log(math.exp(10.0) + K)
    ce_pad = ce_real - 10.0
    expected_ce = (n_real * ce_real + 0.1 * n_pad * ce_pad) / (n_real + 0.1 * n_pad)
    assert losses["loss_ce_mp"].item() == pytest.approx(expected_ce, rel=1e-5)
    assert losses["loss_mask_mp"].item() == pytest.approx(math.log(2.0), rel=1e-5)


def test_hungarian_assignment_matches_each_group_separately():
    """With MP.ASSIGNMENT=hungarian, swapped slots are matched back (~0 loss), one matcher call per group."""
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=256)
    calls = []
    matcher.register_forward_hook(lambda m, args, out: calls.append(args[0]["pred_logits"].shape[1]))
    criterion = make_criterion(matcher, mp_assignment="hungarian")
    swapped = perfect_mp_outputs(num_groups=2)
    for pred in [swapped] + swapped["aux_outputs"]:
        for key in ("pred_logits", "pred_masks"):
            pred[key][0, [2, 3]] = pred[key][0, [3, 2]]  # group 1 of image 0
    outputs = matching_outputs()
    outputs["mp_outputs"] = swapped
    matched = mp_losses(criterion(outputs, targets()))
    assert calls.count(2) == 2 * 3 and calls.count(N) == 3  # 2 groups x 3 predictions; matching part
    hard = mp_losses(make_criterion()(outputs, targets()))
    assert matched["loss_ce_mp"] < 1e-3 < 1.0 < hard["loss_ce_mp"]
    assert hard["loss_mask_mp"] > 3 * matched["loss_mask_mp"]


def test_mp_keys_without_mp_part_or_class_loss():
    outputs = matching_outputs()
    zero = make_criterion()(outputs, targets())  # MP enabled, no mp_outputs (e.g. a step without GT)
    assert set(mp_losses(zero)) == {f"loss_{n}_mp{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    assert all(v.item() == 0.0 for v in mp_losses(zero).values())
    assert not mp_losses(make_criterion(mp_enabled=False)(outputs, targets()))
    outputs["mp_outputs"] = perfect_mp_outputs(num_groups=1)
    no_cls = mp_losses(make_criterion(mp_cls_loss=False)(outputs, targets()))
    assert set(no_cls) == {f"loss_{n}_mp{s}" for n in ("mask", "dice") for s in ("", "_0", "_1")}


def test_from_config_weights_and_keys():
    """DEC_LAYERS 10: MP keys for the final and the 9 aux outputs, weighted 2/5/5 (times LOSS_WEIGHT_MULT)."""
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    mf = cfg.MODEL.MASK_FORMER
    mf.CLASS_WEIGHT, mf.MASK_WEIGHT, mf.DICE_WEIGHT, mf.DEC_LAYERS = 2.0, 5.0, 5.0, 10
    criterion = MPCriterion.from_config(cfg, K, RecordingMatcher())
    for suffix in [""] + [f"_{i}" for i in range(9)]:
        assert criterion.weight_dict[f"loss_ce_mp{suffix}"] == 2.0
        assert criterion.weight_dict[f"loss_mask_mp{suffix}"] == 5.0
        assert criterion.weight_dict[f"loss_dice_mp{suffix}"] == 5.0
    assert "loss_ce_mp_9" not in criterion.weight_dict
    cfg.MODEL.MP.LOSS_WEIGHT_MULT = 0.5
    cfg.MODEL.MASK_FORMER.DN_NO_LB = True  # official key: no MP class loss
    criterion = MPCriterion.from_config(cfg, K, RecordingMatcher())
    assert criterion.weight_dict["loss_mask_mp_3"] == 2.5 and criterion.weight_dict["loss_mask_3"] == 5.0
    assert criterion.mp_losses == ["masks"]
