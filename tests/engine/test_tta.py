"""Semantic test-time augmentation equals the mean of the augmented predictions, computed by hand."""
import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from torch import nn

from qsegformers.engine.tta import SemanticSegmentorWithTTA

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
