"""Tests of SegViT's criterion (qsegformers/losses/atm_criterion.py): fixed query = class supervision,
dense focal/dice values against a hand computation, perfect predictions, the CE ablation and weights."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg

from qsegformers.config import add_qsegformers_config
from qsegformers.losses.atm_criterion import ATMCriterion
from qsegformers.losses.build import build_criterion
from qsegformers.matching.fixed import FixedMatcher

K, B, H, W, h, w = 4, 2, 8, 8, 4, 4
BIG = 30.0


def outputs(seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, K + 1, generator=g).requires_grad_(requires_grad)
    masks = torch.randn(B, K, h, w, generator=g).requires_grad_(requires_grad)
    return {"pred_logits": logits, "pred_masks": masks}


def targets_only_class(c):
    """Image 0: class c on the left half; image 1: nothing."""
    m = torch.zeros(1, H, W)
    m[0, :, : W // 2] = 1
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, H, W)}
    return [{"labels": torch.tensor([c]), "masks": m}, empty]


def test_each_query_is_supervised_by_its_own_class_only():
    crit = ATMCriterion(K)
    out = outputs(requires_grad=True)
    c = 2
    losses = crit(out, targets_only_class(c))
    (mask_grad,) = torch.autograd.grad(losses["loss_mask"] + losses["loss_dice"], out["pred_masks"], retain_graph=True)
    touched = mask_grad.abs().flatten(2).sum(-1) > 0  # B x K
    expected = torch.zeros(B, K, dtype=torch.bool)
    expected[0, c] = True
    assert torch.equal(touched, expected)
    (ce_grad,) = torch.autograd.grad(losses["loss_ce"], out["pred_logits"])
    assert (ce_grad.abs().sum(-1) > 0).all()  # absent classes are pushed towards no-object


def test_class_targets_and_no_object_weight():
    crit = ATMCriterion(K, eos_coef=0.1)
    out = outputs()
    tgt = targets_only_class(1)
    target_classes = torch.full((B, K), K)
    target_classes[0, 1] = 1
    weight = torch.ones(K + 1)
    weight[-1] = 0.1
    expected = F.cross_entropy(out["pred_logits"].transpose(1, 2), target_classes, weight)
    torch.testing.assert_close(crit(out, tgt)["loss_ce"], expected)


def test_dense_focal_and_dice_against_hand_computation():
    crit = ATMCriterion(K, focal_alpha=0.25, focal_gamma=2.0)
    out = outputs(seed=3)
    c = 3
    tgt = targets_only_class(c)
    logit = F.interpolate(out["pred_masks"][:1, c : c + 1], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    t = tgt[0]["masks"][0]
    p = logit.sigmoid()
    ce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    focal = (0.25 * t + 0.75 * (1 - t)) * (1 - p_t) ** 2 * ce
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    losses = crit(out, tgt)
    torch.testing.assert_close(losses["loss_mask"], focal.mean(), rtol=1e-5, atol=1e-6)  # one mask: num_masks 1
    torch.testing.assert_close(losses["loss_dice"], dice, rtol=1e-5, atol=1e-6)


def test_perfect_prediction_gives_near_zero_mask_losses():
    crit = ATMCriterion(K)
    tgt = targets_only_class(0)
    masks = torch.full((B, K, H, W), -BIG)
    masks[0, 0] = torch.where(tgt[0]["masks"][0] > 0, BIG, -BIG)
    logits = torch.full((B, K, K + 1), -BIG)
    logits[..., K] = BIG  # every query: no-object ...
    logits[0, 0, K], logits[0, 0, 0] = -BIG, BIG  # ... except query 0 of image 0: class 0
    losses = crit({"pred_logits": logits, "pred_masks": masks}, tgt)
    assert losses["loss_mask"] < 1e-6 and losses["loss_dice"] < 1e-6 and losses["loss_ce"] < 1e-6


def test_deep_supervision_uses_same_assignment_and_weights():
    crit = ATMCriterion(K, class_weight=1.0, focal_weight=20.0, dice_weight=1.0)
    out = outputs()
    out["aux_outputs"] = [outputs(seed=5), outputs(seed=6)]
    tgt = targets_only_class(1)
    losses = crit(out, tgt)
    assert set(losses) == {f"{k}{s}" for k in ("loss_ce", "loss_mask", "loss_dice") for s in ("", "_0", "_1")}
    torch.testing.assert_close(losses["loss_mask_1"], crit(outputs(seed=6), tgt)["loss_mask"])
    weighted = crit.weighted(losses)
    torch.testing.assert_close(weighted["loss_mask_0"], 20.0 * losses["loss_mask_0"])
    torch.testing.assert_close(weighted["loss_dice_1"], losses["loss_dice_1"])


def test_ce_variant_is_pixel_cross_entropy_of_semantic_scores():
    crit = ATMCriterion(K, loss_type="ce")
    out = outputs(seed=7)
    m0 = torch.zeros(2, H, W)
    m0[0, :4], m0[1, 4:6] = 1, 1  # rows 6-7 uncovered -> ignored
    tgt = [
        {"labels": torch.tensor([0, 2]), "masks": m0},
        {"labels": torch.tensor([3]), "masks": torch.ones(1, H, W)},
    ]
    masks = F.interpolate(out["pred_masks"], size=(H, W), mode="bilinear", align_corners=False)
    probs = out["pred_logits"].softmax(-1)
    total, count = 0.0, 0
    for b in range(B):
        for y in range(H):
            for x in range(W):
                label = None
                for lab, m in zip(tgt[b]["labels"], tgt[b]["masks"]):
                    if m[y, x] > 0:
                        label = int(lab)
                if label is None:
                    continue
                scores = torch.stack(
                    [sum(probs[b, q, c] * masks[b, q, y, x].sigmoid() for q in range(K)) for c in range(K)]
                )
                total = total - torch.log_softmax(scores, 0)[label]
                count += 1
    losses = crit(out, tgt)
    assert set(losses) == {"loss_sem_ce"}
    torch.testing.assert_close(losses["loss_sem_ce"], total / count, rtol=1e-5, atol=1e-6)


def test_config_and_errors():
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    crit = build_criterion(cfg, "ATMCriterion", 150, FixedMatcher())
    assert crit.weight_dict == {"loss_ce": 1.0, "loss_mask": 20.0, "loss_dice": 1.0}
    assert crit.empty_weight[-1] == pytest.approx(0.1) and crit.empty_weight[:-1].eq(1).all()
    assert (crit.focal_alpha, crit.focal_gamma) == (0.25, 2.0)
    with pytest.raises(TypeError, match="FixedMatcher"):
        ATMCriterion(K, matcher=torch.nn.Identity())
    with pytest.raises(ValueError, match="LOSS_TYPE"):
        ATMCriterion(K, loss_type="bce")
    with pytest.raises(KeyError, match="no weight"):
        crit.weighted({"loss_foo": torch.tensor(1.0)})
