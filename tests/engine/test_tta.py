"""Test-time augmentation equals the combination of the augmented predictions computed by hand:
the mean of the semantic scores, panoptic inference over the pooled queries, and the pooled
instances after mask NMS (checked against a numpy IoU)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from torch import nn

from detectron2.structures import Instances

from qsegformers.engine.tta import MaskFormerWithTTA, SemanticSegmentorWithTTA, mask_nms
from qsegformers.inference import QueryPostprocessing

K = 3


class ColourModel(nn.Module):
    """Per-pixel class scores from colour only (a 1x1 linear map), resized to height x width.

    Flip-equivariant by construction; ``positional`` adds a left-to-right ramp, which is not."""

    def __init__(self, positional=False):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Conv2d(3, K, 1)
        self.positional = positional

    def forward(self, batched_inputs):
        out = []
        for x in batched_inputs:
            scores = self.proj(x["image"][None].float() / 255.0)
            if self.positional:
                scores = scores + torch.linspace(0, 1, scores.shape[-1])
            scores = F.interpolate(scores, size=(x["height"], x["width"]), mode="bilinear", align_corners=False)
            out.append({"sem_seg": scores[0].softmax(0)})
        return out


def tta_cfg(min_sizes, flip):
    cfg = get_cfg()
    cfg.TEST.AUG.MASK_NMS_THRESH = 0.5
    cfg.TEST.AUG.MIN_SIZES = min_sizes
    cfg.TEST.AUG.MAX_SIZE = 1000
    cfg.TEST.AUG.FLIP = flip
    return cfg


def image(h=30, w=40):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def by_hand(model, img, min_sizes, flip):
    """Resize (and flip) the image with detectron2 transforms, predict, unflip, average."""
    preds = []
    h, w = img.shape[:2]
    for size in min_sizes:
        for flipped in ([False, True] if flip else [False]):
            tfm = T.ResizeShortestEdge(size, 1000).get_transform(img)
            aug = tfm.apply_image(img)
            if flipped:
                aug = aug[:, ::-1]
            x = {"image": torch.as_tensor(np.ascontiguousarray(aug)).permute(2, 0, 1), "height": h, "width": w}
            pred = model([x])[0]["sem_seg"]
            preds.append(pred.flip(dims=[2]) if flipped else pred)
    return torch.stack(preds).mean(0)


def test_flip_equivariant_model_gives_plain_output():
    model = ColourModel()
    img = image()
    x = {"image": torch.as_tensor(img).permute(2, 0, 1), "height": 30, "width": 40}
    plain = model([x])[0]["sem_seg"]
    tta = SemanticSegmentorWithTTA(tta_cfg([30], flip=True), model)([x])[0]["sem_seg"]
    torch.testing.assert_close(tta, plain, rtol=1e-5, atol=1e-6)


def test_general_model_gives_mean_of_augmented_predictions():
    model = ColourModel(positional=True)
    img = image()
    x = {"image": torch.as_tensor(img).permute(2, 0, 1), "height": 30, "width": 40}
    sizes = [20, 30, 45]
    tta = SemanticSegmentorWithTTA(tta_cfg(sizes, flip=True), model)([x])[0]["sem_seg"]
    expected = by_hand(model, img, sizes, flip=True)
    assert tta.shape == (K, 30, 40)
    torch.testing.assert_close(tta, expected, rtol=1e-5, atol=1e-6)
    # the positional ramp makes flipping matter: TTA differs from the plain prediction
    assert not torch.allclose(tta, model([x])[0]["sem_seg"], atol=1e-3)


# ---------------------------------------------------------------- panoptic and instance TTA

THINGS = {1, 2}
TOPK = 6


class ColourQueryModel(nn.Module):
    """A MaskFormer-protocol model with 3 queries: query q's mask logit is 20 * (channel q - 0.5),
    so on a picture of pure-colour blocks each query segments one colour (flip-equivariant);
    ``positional`` adds a left-to-right ramp to the mask logits. Class logits are fixed per query."""

    def __init__(self, positional=False):
        super().__init__()
        self.positional = positional
        self.semantic_on, self.panoptic_on, self.instance_on = True, True, True
        self.return_query_outputs = False
        # query 0 -> stuff class 0, query 1 -> thing 1, query 2 -> thing 2 (K + 1 columns, softmax)
        self.class_logits = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 3.0, 1.0, 0.0], [0.0, 0.5, 2.5, 0.0]])

    def query_postprocessing(self):
        return QueryPostprocessing(num_classes=K, activation="softmax", object_mask_threshold=0.3,
                                   overlap_threshold=0.5, thing_ids=THINGS, topk=TOPK, panoptic_on=True)

    def forward(self, batched_inputs):
        post = self.query_postprocessing()
        out = []
        for x in batched_inputs:
            logits = 20.0 * (x["image"][None].float() / 255.0 - 0.5)
            if self.positional:
                logits = logits + torch.linspace(-3, 3, logits.shape[-1])
            mask_pred = F.interpolate(logits, size=(x["height"], x["width"]), mode="bilinear", align_corners=False)[0]
            mask_cls = self.class_logits
            result = {
                "sem_seg": post.semantic(mask_cls, mask_pred),
                "panoptic_seg": post.panoptic(mask_cls, mask_pred),
                "instances": post.instances(mask_cls, mask_pred),
            }
            if self.return_query_outputs:
                result["query_outputs"] = {"mask_cls": mask_cls, "mask_pred": mask_pred}
            out.append(result)
        return out


def blocks_image(h=30, w=40):
    """Black picture with a red, a green and a blue block at asymmetric places."""
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[2:14, 1:12, 0] = 255
    img[5:25, 15:22, 1] = 255
    img[16:29, 27:39, 2] = 255
    return img


def as_input(img):
    return {"image": torch.as_tensor(img).permute(2, 0, 1), "height": img.shape[0], "width": img.shape[1]}


def pooled_queries_by_hand(model, img, min_sizes, flip):
    """Every view's query outputs at the original size, flips undone, concatenated in view order."""
    h, w = img.shape[:2]
    model.return_query_outputs = True
    mask_cls, mask_pred = [], []
    for size in min_sizes:
        for flipped in ([False, True] if flip else [False]):
            aug = T.ResizeShortestEdge(size, 1000).get_transform(img).apply_image(img)
            if flipped:
                aug = aug[:, ::-1]
            x = {"image": torch.as_tensor(np.ascontiguousarray(aug)).permute(2, 0, 1), "height": h, "width": w}
            q = model([x])[0]["query_outputs"]
            mask_cls.append(q["mask_cls"])
            mask_pred.append(q["mask_pred"].flip(dims=[2]) if flipped else q["mask_pred"])
    model.return_query_outputs = False
    return torch.cat(mask_cls), torch.cat(mask_pred)


def nms_by_hand(instances, thresh, keep_max):
    """Greedy class-wise NMS with IoU computed by numpy on boolean masks."""
    order = np.argsort(-instances.scores.numpy(), kind="stable")
    masks = instances.pred_masks.numpy().astype(bool)[order]
    classes = instances.pred_classes.numpy()[order]
    kept = []
    for i in range(len(order)):
        clash = False
        for j in kept:
            union = np.logical_or(masks[i], masks[j]).sum()
            iou = np.logical_and(masks[i], masks[j]).sum() / union if union else 0.0
            clash = clash or (classes[i] == classes[j] and iou > thresh)
        if not clash and len(kept) < keep_max:
            kept.append(i)
    return [order[i] for i in kept]


def assert_same_instances(a, b):
    assert len(a) == len(b)
    torch.testing.assert_close(a.scores, b.scores)
    assert torch.equal(a.pred_classes, b.pred_classes)
    assert torch.equal(a.pred_masks, b.pred_masks)


def test_flip_equivariant_query_model_gives_plain_panoptic_and_instances():
    model = ColourQueryModel()
    x = as_input(blocks_image())
    plain = model([x])[0]
    tta = MaskFormerWithTTA(tta_cfg([30], flip=True), model)([x])[0]
    assert "query_outputs" not in tta and model.return_query_outputs is False
    pan_plain, info_plain = plain["panoptic_seg"]
    pan_tta, info_tta = tta["panoptic_seg"]
    assert info_plain == info_tta and len(info_plain) == 3  # stuff 0 and two things
    assert torch.equal(pan_plain, pan_tta)
    # the pooled top-2k holds every plain instance twice; NMS removes exactly the copies
    order = torch.argsort(plain["instances"].scores, descending=True, stable=True)
    assert_same_instances(tta["instances"], plain["instances"][order])


def test_general_query_model_pools_views():
    model = ColourQueryModel(positional=True)
    img = blocks_image()
    sizes = [20, 30, 45]
    tta = MaskFormerWithTTA(tta_cfg(sizes, flip=True), model)([as_input(img)])[0]
    mask_cls, mask_pred = pooled_queries_by_hand(model, img, sizes, flip=True)
    assert mask_cls.shape == (3 * 6, K + 1) and mask_pred.shape == (18, 30, 40)
    post = model.query_postprocessing()

    pan, info = tta["panoptic_seg"]
    pan_ref, info_ref = post.panoptic(mask_cls, mask_pred)
    assert info == info_ref and torch.equal(pan, pan_ref)
    # the views disagree (the ramp is not flip-equivariant), so TTA differs from the plain output
    assert not torch.equal(pan, model([as_input(img)])[0]["panoptic_seg"][0])

    candidates = post.instances(mask_cls, mask_pred, topk=TOPK * 6)
    kept = nms_by_hand(candidates, 0.5, TOPK)
    assert 0 < len(kept) < len(candidates)
    assert_same_instances(tta["instances"], candidates[torch.as_tensor(kept)])


def test_mask_nms_is_class_wise_and_strict():
    base = torch.zeros(4, 10)
    base[0, :6] = 1  # reference
    base[1, :5] = 1  # IoU 5/6 with 0, same class: dropped
    base[2, :5] = 1  # same mask as 1 but another class: kept
    base[3, 3:9] = 1  # IoU 3/9 with 0: kept
    inst = Instances((1, 10))
    inst.pred_masks = base[:, None, :]
    inst.scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    inst.pred_classes = torch.tensor([0, 0, 1, 0])
    kept = mask_nms(inst, 0.5, max_detections=10)
    assert kept.scores.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert kept.pred_classes.tolist() == [0, 1, 0]
    assert len(mask_nms(inst, 0.5, max_detections=2)) == 2
    # an IoU equal to the threshold is kept (strictly greater is suppressed)
    assert len(mask_nms(inst, 5 / 6, max_detections=10)) == 4
