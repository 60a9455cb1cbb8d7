"""Tests of qsegformers/losses/criterion.py."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qsegformers.losses import criterion as criterion_module
from qsegformers.losses.criterion import SetCriterion, build_weight_dict
from qsegformers.matching.hungarian import HungarianMatcher

NUM_CLASSES = 3
EOS_COEF = 0.1
DEC_LAYERS = 3
LOGIT = 30.0  # |logit| of a confident prediction


def _criterion(num_points=64, deep_supervision=True, losses=("labels", "masks"), importance=0.75):
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points)
    weights = build_weight_dict(2.0, 5.0, 5.0, DEC_LAYERS, deep_supervision)
    return SetCriterion(
        NUM_CLASSES, matcher, weights, EOS_COEF, list(losses), num_points, 3.0, importance,
        deep_supervision=deep_supervision,
    )


def _targets():
    """Image 0: two 16x16 targets; image 1: one 12x12 target (different sizes on purpose)."""
    m0 = torch.zeros(2, 16, 16, dtype=torch.bool)
    m0[0, :, :8] = True
    m0[1, 4:12, 8:] = True
    m1 = torch.zeros(1, 12, 12, dtype=torch.bool)
    m1[0, 2:10, 2:10] = True
    return [{"labels": torch.tensor([0, 2]), "masks": m0}, {"labels": torch.tensor([1]), "masks": m1}]


def _random_outputs(num_queries=5, size=8, aux=DEC_LAYERS - 1, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)

    def one():
        return {
            "pred_logits": torch.randn(2, num_queries, NUM_CLASSES + 1, generator=gen, dtype=dtype),
            "pred_masks": torch.randn(2, num_queries, size, size, generator=gen, dtype=dtype),
        }

    outputs = one()
    outputs["aux_outputs"] = [one() for _ in range(aux)]
    return outputs


def test_empty_weight_buffer():
    criterion = _criterion()
    expected = torch.ones(NUM_CLASSES + 1)
    expected[-1] = EOS_COEF
    torch.testing.assert_close(criterion.empty_weight, expected)
    holder = nn.Module()
    holder.criterion = criterion
    assert list(holder.state_dict()) == ["criterion.empty_weight"]


def test_losses_finite_with_aux_suffixes():
    losses = _criterion()(_random_outputs(), _targets())
    expected = {f"{k}{s}" for k in ("loss_ce", "loss_mask", "loss_dice") for s in ("", "_0", "_1")}
    assert set(losses) == expected
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())


def test_no_deep_supervision_skips_aux_outputs():
    losses = _criterion(deep_supervision=False)(_random_outputs(), _targets())
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}


def test_gradients_reach_logits_and_only_matched_masks():
    outputs = _random_outputs(aux=0)
    for v in outputs.values():
        if torch.is_tensor(v):
            v.requires_grad_(True)
    criterion = _criterion()
    torch.manual_seed(0)
    indices = criterion.matcher(outputs, _targets())
    torch.manual_seed(0)
    losses = criterion.weighted(criterion(outputs, _targets()))
    sum(losses.values()).backward()
    assert outputs["pred_logits"].grad.abs().sum(-1).gt(0).all()  # CE supervises every query
    mask_grad = outputs["pred_masks"].grad.abs().flatten(2).sum(-1)
    for b, (src, _) in enumerate(indices):
        matched = torch.zeros(mask_grad.shape[1], dtype=torch.bool)
        matched[src] = True
        assert mask_grad[b, matched].gt(0).all() and mask_grad[b, ~matched].eq(0).all()


def test_finite_difference_gradients_float64():
    base = _random_outputs(num_queries=3, size=4, aux=0, dtype=torch.float64)
    targets = _targets()
    criterion = _criterion(num_points=6)

    def total(pred_logits, pred_masks):
        torch.manual_seed(0)  # same matching and same sampled points on every evaluation
        losses = criterion.weighted(criterion({"pred_logits": pred_logits, "pred_masks": pred_masks}, targets))
        return sum(losses.values())

    inputs = (base["pred_logits"].requires_grad_(True), base["pred_masks"].requires_grad_(True))
    assert torch.autograd.gradcheck(total, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


def _perfect_outputs(targets, num_queries=4, size=8, mask_logit=LOGIT):
    """Matched queries predict their target exactly; the others predict no-object."""
    logits = torch.full((len(targets), num_queries, NUM_CLASSES + 1), -LOGIT)
    logits[..., NUM_CLASSES] = LOGIT
    masks = torch.full((len(targets), num_queries, size, size), -mask_logit)
    for b, t in enumerate(targets):
        for j, (label, mask) in enumerate(zip(t["labels"], t["masks"])):
            logits[b, j] = -LOGIT
            logits[b, j, label] = LOGIT
            resized = F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")
            masks[b, j] = mask_logit * (2 * resized[0, 0] - 1)
    return {"pred_logits": logits, "pred_masks": masks}


def test_perfect_predictions_give_near_zero_losses(monkeypatch):
    """Sampled at the prediction's pixel centres, a perfect prediction has ~0 loss.

    (At random points, bilinear interpolation across a mask edge or the zero-padded image
    border blurs the target but not the confident logits, so the loss is never exactly 0.)
    """
    size = 8
    calls = []

    def pixel_centres(coarse_logits, uncertainty_func, num_points, oversample_ratio, importance_sample_ratio):
        calls.append(coarse_logits.shape)
        centres = (torch.arange(size, dtype=coarse_logits.dtype) + 0.5) / size
        grid = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), dim=-1).reshape(-1, 2)
        return grid[None].expand(coarse_logits.shape[0], -1, -1)

    monkeypatch.setattr(criterion_module, "get_uncertain_point_coords_with_randomness", pixel_centres)
    targets = _targets()  # 16x16 and 12x12 targets on an 8x8 prediction grid
    targets[1]["masks"] = F.interpolate(targets[1]["masks"][None, :, 2:10, 2:10].float(), size=(16, 16))[0]
    losses = _criterion(deep_supervision=False)(_perfect_outputs(targets, size=size), targets)
    assert calls == [(3, 1, size, size)]  # points chosen from the 3 matched predicted masks
    assert losses["loss_mask"].item() < 1e-6
    assert losses["loss_dice"].item() < 1e-6
    assert losses["loss_ce"].item() < 1e-6


def test_perfect_predictions_beat_random_ones():
    targets = [{"labels": t["labels"], "masks": t["masks"][:, :12, :12]} for t in _targets()]
    criterion = _criterion(num_points=256, deep_supervision=False)
    torch.manual_seed(0)
    perfect = criterion(_perfect_outputs(targets, size=12, mask_logit=4.0), targets)
    random = criterion(_random_outputs(num_queries=4, size=12, aux=0), targets)
    for key in ("loss_ce", "loss_mask", "loss_dice"):
        assert perfect[key] < 0.75 * random[key], key


def test_num_masks_and_empty_batches():
    criterion = _criterion()
    assert criterion.get_num_masks(_targets(), torch.device("cpu")) == 3
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8)} for _ in range(2)]
    assert criterion.get_num_masks(empty, torch.device("cpu")) == 1
    outputs = _random_outputs()
    outputs["pred_masks"].requires_grad_(True)
    losses = criterion(outputs, empty)
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    assert losses["loss_ce"] > 0  # every query is supervised as no-object
    sum(losses.values()).backward()
    assert outputs["pred_masks"].grad is not None


def test_target_masks_are_zero_padded_to_a_common_size():
    targets = _targets()
    indices = [(torch.tensor([0, 1]), torch.tensor([1, 0])), (torch.tensor([3]), torch.tensor([0]))]
    stacked = SetCriterion._matched_target_masks(targets, indices)
    assert stacked.shape == (3, 16, 16)
    assert torch.equal(stacked[0], targets[0]["masks"][1])
    assert torch.equal(stacked[2, :12, :12], targets[1]["masks"][0])
    assert not stacked[2, 12:].any() and not stacked[2, :, 12:].any()


def test_unmatched_queries_are_no_object_in_ce():
    criterion = _criterion()
    logits = torch.zeros(1, 2, NUM_CLASSES + 1)
    logits[0, 1, NUM_CLASSES] = LOGIT  # query 1 confidently "no object"
    logits[0, 0, 2] = LOGIT  # query 0 confidently class 2
    targets = [{"labels": torch.tensor([2]), "masks": torch.ones(1, 4, 4)}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    loss = criterion.loss_labels({"pred_logits": logits}, targets, indices, 1)["loss_ce"]
    assert loss.item() < 1e-6
    swapped = [(torch.tensor([1]), torch.tensor([0]))]
    assert criterion.loss_labels({"pred_logits": logits}, targets, swapped, 1)["loss_ce"] > 1


def test_weighted_and_weight_dict():
    weights = build_weight_dict(2.0, 5.0, 1.0, dec_layers=4, deep_supervision=True)
    assert len(weights) == 3 * 4 and weights["loss_mask_2"] == 5.0 and "loss_ce_3" not in weights
    assert build_weight_dict(2.0, 5.0, 1.0, dec_layers=4, deep_supervision=False) == {
        "loss_ce": 2.0,
        "loss_mask": 5.0,
        "loss_dice": 1.0,
    }
    criterion = _criterion()
    weighted = criterion.weighted({"loss_ce": torch.tensor(1.5), "loss_dice_1": torch.tensor(2.0)})
    assert weighted["loss_ce"].item() == 3.0 and weighted["loss_dice_1"].item() == 10.0
    with pytest.raises(KeyError, match="loss_extra"):
        criterion.weighted({"loss_extra": torch.tensor(1.0)})


def test_subclass_adds_a_loss_term():
    class ExtraCriterion(SetCriterion):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_fns["extra"] = self.loss_extra
            self.losses.append("extra")

        def loss_extra(self, outputs, targets, indices, num_masks):
            return {"loss_extra": outputs["pred_logits"].sum() * 0 + num_masks}

    base = _criterion()
    criterion = ExtraCriterion(
        NUM_CLASSES, base.matcher, {}, EOS_COEF, ["labels"], 16, 3.0, 0.75, deep_supervision=True
    )
    losses = criterion(_random_outputs(), _targets())
    assert set(losses) == {"loss_ce", "loss_extra", "loss_ce_0", "loss_extra_0", "loss_ce_1", "loss_extra_1"}
    assert losses["loss_extra"].item() == 3


def test_unknown_loss_name():
    with pytest.raises(KeyError, match="boxes"):
        _criterion(losses=("labels", "boxes"))


def test_build_criterion_from_config():
    from detectron2.config import get_cfg

    from qsegformers import add_qsegformers_config
    from qsegformers.losses import build_criterion

    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 3
    cfg.MODEL.MASK_FORMER.NO_OBJECT_WEIGHT = 0.25
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 77
    criterion = build_criterion(cfg, "SetCriterion", 5, matcher=None)
    assert isinstance(criterion, SetCriterion)
    assert criterion.num_points == 77 and criterion.empty_weight.tolist() == [1, 1, 1, 1, 1, 0.25]
    assert sorted(criterion.weight_dict) == sorted(
        [f"{k}{s}" for k in ("loss_ce", "loss_mask", "loss_dice") for s in ("", "_0", "_1")]
    )
    with pytest.raises(KeyError, match="MODEL.MASK_FORMER.CRITERION_NAME"):
        build_criterion(cfg, "NoSuchCriterion", 5, matcher=None)



# One image, two targets; for the aux-matching test only the class cost matters (masks are all ones).
_AUX_TARGETS = [{"labels": torch.tensor([0, 2]), "masks": torch.ones(2, 4, 4)}]


def _preferring(assignment, num_queries=3, logit=3.0):
    """Outputs (1 x Q x (K+1) logits) in which query assignment[j] predicts target j's class, the rest no-object."""
    logits = torch.zeros(1, num_queries, NUM_CLASSES + 1)
    logits[0, :, NUM_CLASSES] = logit
    for j, q in enumerate(assignment):
        logits[0, q] = 0.0
        logits[0, q, _AUX_TARGETS[0]["labels"][j]] = logit
    return {"pred_logits": logits, "pred_masks": torch.zeros(1, num_queries, 4, 4)}


def _brute_force_ce(logits, labels, empty_weight):
    """The class cost's optimal assignment by enumeration, and the weighted CE under it, written out."""
    probs = logits[0].softmax(-1)
    num_queries = logits.shape[1]
    best = min(
        itertools.permutations(range(num_queries), len(labels)),
        key=lambda qs: -sum(probs[q, labels[j]].item() for j, q in enumerate(qs)),
    )
    classes = [NUM_CLASSES] * num_queries
    for j, q in enumerate(best):
        classes[q] = int(labels[j])
    log_p = logits[0].log_softmax(-1)
    w = torch.stack([empty_weight[c] for c in classes])
    nll = torch.stack([-log_p[q, c] for q, c in enumerate(classes)])
    return best, (w * nll).sum() / w.sum()


def test_each_aux_output_is_matched_with_its_own_predictions():
    """Final and aux outputs prefer different query -> target assignments: every aux loss equals the CE under
    that aux output's own optimal assignment (brute force), and the matcher sees each output's logits."""
    assignments = [(1, 2), (2, 0), (0, 1)]  # aux 0, aux 1, final: the queries predicting target 0, target 1
    aux = [_preferring(a) for a in assignments[:2]]
    outputs = dict(_preferring(assignments[2]), aux_outputs=aux)
    seen = []

    class RecordingMatcher(HungarianMatcher):
        def forward(self, outputs, targets):
            seen.append(outputs["pred_logits"])
            return super().forward(outputs, targets)

    matcher = RecordingMatcher(cost_class=1.0, cost_mask=0.0, cost_dice=0.0, num_points=4)
    criterion = SetCriterion(
        NUM_CLASSES, matcher, build_weight_dict(1.0, 1.0, 1.0, DEC_LAYERS, True), EOS_COEF, ["labels"], 4, 3.0, 0.75
    )
    losses = criterion(outputs, _AUX_TARGETS)
    assert len(seen) == 3 and seen[0] is outputs["pred_logits"]
    assert all(s is a["pred_logits"] for s, a in zip(seen[1:], aux))
    labels = _AUX_TARGETS[0]["labels"]
    for key, out, preferred in zip(("loss_ce_0", "loss_ce_1", "loss_ce"), aux + [outputs], assignments):
        best, expected = _brute_force_ce(out["pred_logits"], labels, criterion.empty_weight)
        assert best == preferred
        torch.testing.assert_close(losses[key], expected)
    # under the final output's assignment the aux losses would be far larger: the check discriminates
    final = [(torch.tensor(assignments[2]), torch.arange(2))]
    for i, out in enumerate(aux):
        assert criterion.loss_labels(out, _AUX_TARGETS, final, 2)["loss_ce"] > losses[f"loss_ce_{i}"] + 0.5
