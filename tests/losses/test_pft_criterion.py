"""PFTCriterion: class / mask / attention-weight loss values computed by hand, the attention-loss
switch-off, fixed matching (permutation equivariance) and deep supervision."""
import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage

from qsegformers import add_qsegformers_config
from qsegformers.decoders.pft_config import add_pft_config
from qsegformers.losses.build import build_criterion
from qsegformers.losses.pft_criterion import LOSS_KEYS, PFTCriterion, attention_targets, pft_weight_dict
from qsegformers.matching.build import build_matcher
from qsegformers.matching.hungarian import HungarianMatcher

LOG2 = math.log(2)


def criterion(num_classes, num_aux=0, **kwargs):
    weights = dict(zip(LOSS_KEYS, (1.0, 2.0, 20.0, 1.0, 0.1)))
    return PFTCriterion(num_classes, weight_dict=pft_weight_dict(weights, num_aux), **kwargs)


def outputs(batch, num_classes, mask_size=(2, 2), attn_sizes=((2, 2),), seed=0, num_aux=0):
    """Random decoder outputs; aux entry 0 (the input-query prediction) has no attention logits."""
    g = torch.Generator().manual_seed(seed)

    def one(with_attn):
        per_scale = torch.randn(3, batch, num_classes, generator=g)
        return {
            "pred_class_logits": per_scale.mean(0),
            "pred_class_logits_per_scale": per_scale,
            "pred_masks": torch.randn(batch, num_classes, *mask_size, generator=g),
            "attn_logits": (
                [torch.randn(batch, num_classes, *s, generator=g) for s in attn_sizes] if with_attn else None
            ),
        }

    out = one(True)
    out["aux_outputs"] = [one(i > 0) for i in range(num_aux)]
    return out


def target(labels, masks):
    return {"labels": torch.tensor(labels, dtype=torch.int64), "masks": torch.stack(masks).to(torch.uint8)}


# A 4 x 4 mask whose 2 x 2 block areas are 4, 3, 2 and 1 pixels -> area target [0.4, 0.3, 0.2, 0.1].
GRADED = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]])


def test_attention_targets_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    t = attention_targets(mask[None], torch.tensor([1]), 3, (2, 2), "area")
    # area means of the 2 x 2 blocks: 1, 1/4, 0, 0 -> normalised 0.8, 0.2, 0, 0
    torch.testing.assert_close(t[1], torch.tensor([0.8, 0.2, 0.0, 0.0]))
    torch.testing.assert_close(t[0], torch.full((4,), 0.25))  # absent: uniform 1 / (h w)
    torch.testing.assert_close(t[2], torch.full((4,), 0.25))
    # nearest keeps pixels (0,0), (0,2), (2,0), (2,2)
    t = attention_targets(mask[None], torch.tensor([1]), 3, (2, 2), "nearest")
    torch.testing.assert_close(t[1], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    # a mask that vanishes under the resampling falls back to uniform
    speck = torch.zeros(4, 4, dtype=torch.long)
    speck[1, 1] = 1
    torch.testing.assert_close(attention_targets(speck[None], torch.tensor([0]), 2, (2, 2), "nearest")[0],
                               torch.full((4,), 0.25))
    torch.testing.assert_close(attention_targets(GRADED[None], torch.tensor([0]), 1, (2, 2))[0],
                               torch.tensor([0.4, 0.3, 0.2, 0.1]))


def test_attention_loss_value_for_uniform_absent_and_exact_present_attention():
    t = torch.tensor([0.4, 0.3, 0.2, 0.1])
    out = outputs(1, 2, attn_sizes=((2, 2), (1, 1)))
    out["attn_logits"][0][0, 0] = t.log().view(2, 2) + 3.0  # softmax = t: CE = entropy(t), the minimum
    out["attn_logits"][0][0, 1] = 0.7  # uniform attention for the absent class: CE = log(4)
    targets = [target([0], [GRADED])]
    entropy = -(0.4 * math.log(0.4) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    # mean over classes of omega_k CE_k at stride "2 x 2"; the 1 x 1 grid has CE 0; mean over the 2 scales
    expected = ((1.0 * entropy + 0.1 * math.log(4)) / 2 + 0.0) / 2
    crit = criterion(2)
    torch.testing.assert_close(crit(out, targets)["loss_attn"], torch.tensor(expected))
    out["attn_logits"][0][0, 0, 0, 0] += 0.5
    assert crit(out, targets)["loss_attn"] > expected
    out["attn_logits"][0][0, 0, 0, 0] -= 0.5
    no_absent = criterion(2, absent_uniform=False)  # the "L_attn w/o" ablation: absent classes add nothing
    torch.testing.assert_close(no_absent(out, targets)["loss_attn"], torch.tensor(entropy / 4))


def test_class_losses_use_alpha_for_present_and_one_minus_alpha_for_absent_classes():
    out = outputs(1, 4)
    out["pred_class_logits"].zero_()
    out["pred_class_logits_per_scale"].zero_()
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 4, 4, dtype=torch.uint8)}
    losses = criterion(4)(out, [empty])
    torch.testing.assert_close(losses["loss_ce"], torch.tensor(LOG2))
    torch.testing.assert_close(losses["loss_focal_ce"], torch.tensor(3 * 0.75 * 0.25 * LOG2))  # 3 scales
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0
    losses = criterion(4)(out, [target([1], [GRADED])])
    # per scale: mean over 4 classes of alpha_t (1 - p_t)^2 log 2 with p_t = 1/2
    per_scale = (0.25 * 0.25 + 3 * 0.75 * 0.25) / 4 * LOG2
    torch.testing.assert_close(losses["loss_focal_ce"], torch.tensor(3 * per_scale))


def test_mask_losses_by_hand_dense_and_points():
    out = outputs(1, 3, mask_size=(2, 2))
    out["pred_masks"].zero_()
    mask = torch.zeros(4, 4, dtype=torch.long)
    mask[:2, :2] = 1
    losses = criterion(3)(out, [target([2], [mask])])
    # 16 pixels, 4 positive, p = 1/2 everywhere: focal = log2 * 0.25 * mean(alpha_t)
    torch.testing.assert_close(losses["loss_mask"], torch.tensor(LOG2 * 0.25 * (0.25 * 4 + 0.75 * 12) / 16))
    torch.testing.assert_close(losses["loss_dice"], torch.tensor(1 - (2 * 0.5 * 4 + 1) / (0.5 * 16 + 4 + 1)))
    # point-sampled: an empty target mask is 0 at every sampled point, whatever the points are
    empty = torch.zeros(4, 4, dtype=torch.long)
    points = criterion(3, mask_loss_sampling="points", num_points=20)(out, [target([2], [empty])])
    torch.testing.assert_close(points["loss_mask"], torch.tensor(LOG2 * 0.25 * 0.75))
    torch.testing.assert_close(points["loss_dice"], torch.tensor(1 - 1 / (0.5 * 20 + 1)))


def test_absent_class_masks_are_not_supervised_but_its_class_logit_is():
    crit = criterion(3)
    targets = [target([0, 2], [GRADED, 1 - GRADED])]
    out = outputs(1, 3, mask_size=(4, 4))
    base = crit(out, targets)
    out["pred_masks"][0, 1] += 5.0  # class 1 is absent
    changed = crit(out, targets)
    assert changed["loss_mask"] == base["loss_mask"] and changed["loss_dice"] == base["loss_dice"]
    out["pred_class_logits"][0, 1] += 1.0
    assert crit(out, targets)["loss_ce"] != base["loss_ce"]


def permute_classes(out, perm):
    """Query perm[k] of the result is query k of ``out``."""
    def along(x, dim):
        y = torch.empty_like(x)
        index = [slice(None)] * x.dim()
        index[dim] = perm
        y[tuple(index)] = x
        return y

    result = {
        "pred_class_logits": along(out["pred_class_logits"], 1),
        "pred_class_logits_per_scale": along(out["pred_class_logits_per_scale"], 2),
        "pred_masks": along(out["pred_masks"], 1),
        "attn_logits": None if out["attn_logits"] is None else [along(a, 1) for a in out["attn_logits"]],
    }
    if "aux_outputs" in out:
        result["aux_outputs"] = [permute_classes(a, perm) for a in out["aux_outputs"]]
    return result


def test_permuting_classes_and_queries_together_leaves_every_loss_unchanged():
    torch.manual_seed(0)
    out = outputs(2, 5, mask_size=(4, 4), attn_sizes=((2, 2), (1, 1)), num_aux=2)
    masks = [(torch.rand(4, 4) > 0.5).long() for _ in range(3)]
    targets = [target([3, 0], masks[:2]), target([4], masks[2:])]
    perm = torch.tensor([2, 4, 0, 1, 3])
    permuted_targets = [{"labels": perm[t["labels"]], "masks": t["masks"]} for t in targets]
    crit = criterion(5, num_aux=2)
    base = crit(out, targets)
    permuted = crit(permute_classes(out, perm), permuted_targets)
    assert base.keys() == permuted.keys()
    for key in base:
        torch.testing.assert_close(permuted[key], base[key])
    # a different (wrong) class assignment changes the losses
    wrong = crit(permute_classes(out, perm), targets)
    assert not torch.allclose(wrong["loss_mask"], base["loss_mask"])


def test_deep_supervision_terms_and_attention_switch_off():
    layers = 3
    crit = criterion(4, num_aux=layers, attn_loss_end_iter=10)
    out = outputs(1, 4, num_aux=layers)  # layers 1..3 have attention logits, the input queries not
    targets = [target([1], [GRADED])]
    crit.cur_iter = 9
    losses = crit(out, targets)
    cls_mask = [k for k in losses if not k.startswith("loss_attn")]
    assert len([k for k in losses if k.startswith("loss_ce")]) == layers + 1
    assert len([k for k in losses if k.startswith("loss_mask")]) == layers + 1
    assert sorted(k for k in losses if k.startswith("loss_attn")) == ["loss_attn", "loss_attn_1", "loss_attn_2"]
    crit.cur_iter = 10
    after = crit(out, targets)
    assert sorted(after) == sorted(cls_mask)
    weighted = crit.weighted(after)
    expected = sum(losses[k] * crit.weight_dict[k] for k in cls_mask)
    torch.testing.assert_close(sum(weighted.values()), expected)
    # under the trainer the EventStorage iteration wins over the attribute
    crit.cur_iter = 0
    with EventStorage(start_iter=10):
        assert not any(k.startswith("loss_attn") for k in crit(out, targets))
    crit.cur_iter = 100
    with EventStorage(start_iter=9):
        assert "loss_attn" in crit(out, targets)
    last_only = criterion(4, num_aux=layers, attn_loss_layers="last")
    assert [k for k in last_only(out, targets) if k.startswith("loss_attn")] == ["loss_attn"]


def test_from_config_and_matcher_check():
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    add_pft_config(cfg)
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 7
    cfg.SOLVER.MAX_ITER = 160000
    cfg.MODEL.PFT.FOCAL_CE_WEIGHT = 2.0
    crit = build_criterion(cfg, "PFTCriterion", 150, build_matcher(cfg, "FixedMatcher"))
    assert isinstance(crit, PFTCriterion) and crit.attn_loss_end_iter == 120000
    assert crit.weight_dict["loss_focal_ce_5"] == 2.0 and crit.weight_dict["loss_mask"] == 20.0
    assert crit.weight_dict["loss_attn_3"] == 0.1 and "loss_ce_6" not in crit.weight_dict
    with pytest.raises(TypeError, match="FixedMatcher"):
        PFTCriterion(3, matcher=HungarianMatcher(num_points=16), weight_dict={})
