"""Tests of sliding-window semantic inference (qsegformers/sliding_window.py and the MaskFormer hook):
window placement, count-map averaging, and equality with whole-image inference for a model that is
translation-equivariant by construction (1x1 convolutions only), for images smaller than, equal to and
larger than the crop."""
from typing import Dict

import pytest
import torch
from detectron2.layers import ShapeSpec
from torch import nn

from qsegformers.decoders.base import QueryDecoder
from qsegformers.meta_arch import MaskFormer
from qsegformers.sliding_window import sliding_window_scores, window_starts

K, C = 3, 3


def test_window_starts_cover_the_side_like_mmseg():
    assert window_starts(10, 6, 4) == [0, 4]
    assert window_starts(6, 6, 4) == [0]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    with pytest.raises(ValueError, match="SLIDE_STRIDE"):
        window_starts(10, 4, 5)


def test_overlapping_windows_are_averaged_with_the_count_map():
    """Each window scores a constant (its mean value); the expected average is computed by hand for a
    10 x 10 image, crop 6, stride 4: windows start at 0 and 4 on each side."""
    image = torch.arange(100, dtype=torch.float32).reshape(1, 10, 10)
    out = sliding_window_scores(image, lambda w: w.mean().expand(1, 1, *w.shape[-2:]), crop=6, stride=4)
    means = {(y, x): image[0, y : y + 6, x : x + 6].mean() for y in (0, 4) for x in (0, 4)}
    expected = torch.zeros(10, 10)
    for r in range(10):
        for c in range(10):
            covering = [means[(y, x)] for y in (0, 4) for x in (0, 4) if y <= r < y + 6 and x <= c < x + 6]
            expected[r, c] = sum(covering) / len(covering)
    torch.testing.assert_close(out[0], expected)


def test_small_image_is_padded_to_the_crop():
    seen = []
    image = torch.ones(1, 3, 5)

    def score(w):
        seen.append(tuple(w.shape[-2:]))
        return w
    out = sliding_window_scores(image, score, crop=8, stride=6)
    assert seen == [(8, 8)]
    assert out.shape == (1, 3, 5) and out.eq(1).all()


class _PixelBackbone(nn.Module):
    """1x1 conv at stride 1: translation equivariant, no padding effects."""

    size_divisibility = 1

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, 8, 1)

    def forward(self, x) -> Dict[str, torch.Tensor]:
        return {"feat": torch.tanh(self.conv(x))}

    def output_shape(self):
        return {"feat": ShapeSpec(channels=8, stride=1)}


class _Predictor(QueryDecoder):
    class_activation = "softmax"


class _PixelHead(nn.Module):
    """Per-pixel masks (1x1 conv) and constant class logits: every output pixel depends on one input pixel."""

    num_classes = K

    def __init__(self):
        super().__init__()
        self.predictor = _Predictor()
        self.mask = nn.Conv2d(8, K, 1)
        self.logits = nn.Parameter(torch.randn(K, K + 1))

    def forward(self, features, targets=None):
        x = features["feat"]
        return {"pred_logits": self.logits.expand(x.shape[0], -1, -1), "pred_masks": self.mask(x), "aux_outputs": []}


def build_model(sliding):
    torch.manual_seed(0)
    return MaskFormer(
        backbone=_PixelBackbone(),
        sem_seg_head=_PixelHead(),
        criterion=nn.Identity(),
        num_queries=K,
        object_mask_threshold=0.0,
        overlap_threshold=0.0,
        metadata=None,
        size_divisibility=-1,
        sem_seg_postprocess_before_inference=False,
        pixel_mean=[100.0, 110.0, 120.0],
        pixel_std=[50.0, 60.0, 70.0],
        sliding_window=sliding,
        slide_crop=16,
        slide_stride=10,
    ).eval()


@pytest.mark.parametrize("size", [(9, 13), (16, 16), (37, 29)])
def test_meta_arch_sliding_window_equals_whole_image_for_equivariant_model(size):
    whole, sliding = build_model(False), build_model(True)
    image = torch.rand(C, *size, generator=torch.Generator().manual_seed(1)) * 255
    inputs = [{"image": image, "height": size[0] * 2, "width": size[1] * 2}]
    with torch.no_grad():
        ref, out = whole(inputs), sliding(inputs)
    assert set(out[0]) == set(ref[0]) == {"sem_seg"}
    assert out[0]["sem_seg"].shape == (K, size[0] * 2, size[1] * 2)
    torch.testing.assert_close(out[0]["sem_seg"], ref[0]["sem_seg"], rtol=1e-5, atol=1e-6)


def test_sliding_window_differs_for_a_model_that_sees_the_whole_image():
    """Sanity of the equality test above: a model with a global term does give different scores."""
    whole, sliding = build_model(False), build_model(True)
    for model in (whole, sliding):
        original = model.backbone.forward
        model.backbone.forward = lambda x, f=original: {"feat": f(x)["feat"] + x.mean()}
    image = torch.rand(C, 37, 29, generator=torch.Generator().manual_seed(2)) * 255
    with torch.no_grad():
        ref, out = whole([{"image": image}]), sliding([{"image": image}])
    assert not torch.allclose(out[0]["sem_seg"], ref[0]["sem_seg"], atol=1e-4)


def test_sliding_window_rejects_panoptic_outputs():
    with pytest.raises(ValueError, match="SLIDING_WINDOW"):
        MaskFormer(
            backbone=_PixelBackbone(), sem_seg_head=_PixelHead(), criterion=nn.Identity(), num_queries=K,
            object_mask_threshold=0.0, overlap_threshold=0.0, metadata=None, size_divisibility=-1,
            sem_seg_postprocess_before_inference=False, pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3,
            panoptic_on=True, sliding_window=True, slide_crop=16, slide_stride=10,
        )
