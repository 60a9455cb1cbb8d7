"""SeMask semantic-prior fuse and loss, and their wiring in MaskFormer (spec §9, items 2, 9, 10, 11)."""
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances

from qsegformers import add_qsegformers_config
from qsegformers.losses.semask_prior import fuse_priors, semantic_targets, semask_prior_loss

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
TOY = os.path.join(REPO, "configs", "toy", "semantic-segmentation", "maskformer2_semask_swin_toy.yaml")
IGNORE = 255


def test_fuse_sums_stage_priors_at_image_size():
    # Constant maps stay constant under bilinear resizing: the fused logits are the sum of the constants.
    priors = [torch.full((2, 3, 64 // s, 96 // s), float(c)) for s, c in zip((4, 8, 16, 32), (1, 2, 4, 8))]
    fused = fuse_priors(priors, (64, 96))
    assert fused.shape == (2, 3, 64, 96)
    torch.testing.assert_close(fused, torch.full_like(fused, 15.0))
    # A ramp along x on the stride-4 grid is upsampled x4 exactly as one bilinear resize would.
    ramp = torch.arange(24.0).view(1, 1, 1, 24).expand(1, 1, 16, 24)
    expected = F.interpolate(ramp, size=(64, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(fuse_priors([ramp], (64, 96)), expected)


def test_semantic_targets_paint_masks_and_ignore_the_rest():
    masks = torch.zeros(2, 3, 4, dtype=torch.bool)
    masks[0, 0, :2] = True
    masks[1, 2, 1:] = True
    gt = semantic_targets([{"labels": torch.tensor([4, 1]), "masks": masks}], (4, 5), IGNORE)
    expected = torch.tensor(
        [[4, 4, IGNORE, IGNORE, IGNORE], [IGNORE] * 5, [IGNORE, 1, 1, 1, IGNORE], [IGNORE] * 5]
    )
    assert torch.equal(gt[0], expected)


def test_loss_ignores_255_and_all_ignored_is_zero():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    gt = torch.tensor([[[0, 2], [IGNORE, 1]]])
    loss = semask_prior_loss(logits, gt, IGNORE)
    log_p = torch.log_softmax(logits.detach(), dim=1)[0]
    by_hand = -(log_p[0, 0, 0] + log_p[2, 0, 1] + log_p[1, 1, 1]) / 3
    torch.testing.assert_close(loss, by_hand)
    changed = logits.detach().clone()
    changed[0, :, 1, 0] += torch.tensor([5.0, -3.0, 1.0])  # the ignored pixel
    torch.testing.assert_close(semask_prior_loss(changed, gt, IGNORE), loss.detach())
    empty = semask_prior_loss(logits, torch.full_like(gt, IGNORE), IGNORE)
    assert empty.item() == 0.0
    empty.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def toy_cfg(**semask):
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.merge_from_file(TOY)
    cfg.MODEL.DEVICE = "cpu"
    for key, value in semask.items():
        cfg.MODEL.SEMASK[key] = value
    return cfg


def toy_batch():
    """Two 64x64 images with a left class-0 half and a right class-3 square; the rest is unlabelled."""
    batch = []
    for shift in (0, 8):
        image = torch.zeros(3, 64, 64)
        image[0, :, :32] = 200.0
        image[2, 16 + shift : 48, 40:] = 250.0
        masks = torch.zeros(2, 64, 64, dtype=torch.bool)
        masks[0, :, :32] = True
        masks[1, 16 + shift : 48, 40:] = True
        inst = Instances((64, 64))
        inst.gt_classes = torch.tensor([0, 3])
        inst.gt_masks = BitMasks(masks)
        batch.append({"image": image, "instances": inst, "height": 64, "width": 64})
    return batch


def test_one_prior_term_weighted_once():
    torch.manual_seed(0)
    model = build_model(toy_cfg()).train()
    captured = {}
    model.backbone.register_forward_hook(lambda m, inp, out: captured.update(out))
    batch = toy_batch()
    losses = model(batch)
    prior_keys = [k for k in losses if "sem" in k or "prior" in k]
    assert prior_keys == ["loss_sem_prior"]
    priors = [captured[f"sem_res{i}"] for i in range(2, 6)]
    gt = torch.full((2, 64, 64), IGNORE)
    for b, item in enumerate(batch):
        for label, mask in zip(item["instances"].gt_classes, item["instances"].gt_masks.tensor):
            gt[b][mask] = label
    ce = F.cross_entropy(fuse_priors(priors, (64, 64)), gt, ignore_index=IGNORE)
    torch.testing.assert_close(losses["loss_sem_prior"], 0.4 * ce)


def test_official_cate_weight_sets_the_prior_weight():
    cfg = toy_cfg()
    cfg.MODEL.MASK_FORMER.CATE_WEIGHT = 0.7
    assert build_model(cfg).criterion.weight_dict["loss_sem_prior"] == pytest.approx(0.7)
    cfg.MODEL.SEMASK.PRIOR_LOSS_WEIGHT = 0.1
    with pytest.raises(ValueError, match="CATE_WEIGHT"):
        build_model(cfg)


def test_eval_output_independent_of_prior_weight():
    outputs = []
    for weight in (0.4, 1.0):
        torch.manual_seed(0)
        model = build_model(toy_cfg(PRIOR_LOSS_WEIGHT=weight)).eval()
        with torch.no_grad():
            outputs.append(model(toy_batch())[0]["sem_seg"])
    assert outputs[0].shape == (6, 64, 64)
    torch.testing.assert_close(outputs[0], outputs[1])


def test_toy_training_decreases_prior_loss():
    """40 AdamW steps of the toy SeMask config on a fixed batch: loss_sem_prior falls clearly."""
    torch.manual_seed(0)
    cfg = toy_cfg()
    model = build_model(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.SOLVER.BASE_LR * 2)
    batch = toy_batch()
    history = []
    for _ in range(40):
        losses = model(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        history.append(losses["loss_sem_prior"].item())
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    print(f"loss_sem_prior: first 5 mean {first:.4f}, last 5 mean {last:.4f}")
    assert last < 0.5 * first
