"""Sliding-window semantic inference: class scores of overlapping crops, averaged where they overlap.

Models whose receptive field or query grid is tied to the training crop (SegViT's Shrunk QU queries) must
be tested on crops of that size; any semantic model can use it (``TEST.SLIDING_WINDOW``). The window
placement is mmsegmentation's ``slide_inference``: ``n = ceil((L - crop) / stride) + 1`` windows per side,
the last one moved back to end at the border. Unlike mmseg, the image is first zero-padded (bottom/right)
to at least the crop, so every window is exactly crop x crop.
"""
from typing import Callable, List

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["window_starts", "sliding_window_scores"]

# Value of the padding added to images smaller than the crop: 0 is the mean of a normalised image.
PAD_VALUE = 0.0


def window_starts(length: int, crop: int, stride: int) -> List[int]:
    """Start offsets of the windows along one side of ``length`` >= ``crop`` pixels.

    ``n = max(length - crop + stride - 1, 0) // stride + 1`` windows start at ``i * stride``, clamped so
    that each ends inside the side: the first starts at 0, the last ends at ``length``.
    """
    if crop <= 0 or stride <= 0:
        raise ValueError(
            f"sliding window needs a positive crop and stride (TEST.SLIDE_CROP/SLIDE_STRIDE), got {crop}, {stride}"
        )
    if stride > crop:
        raise ValueError(f"TEST.SLIDE_STRIDE {stride} > TEST.SLIDE_CROP {crop} would leave pixels uncovered")
    if length < crop:
        raise ValueError(f"side of {length} pixels is shorter than the crop {crop}; pad the image first")
    num = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, length) - crop, 0) for i in range(num)]


def sliding_window_scores(
    image: Tensor, score_fn: Callable[[Tensor], Tensor], crop: int, stride: int
) -> Tensor:
    """Average of ``score_fn`` over overlapping crop x crop windows of one image.

    Args:
        image: C x H x W normalised image (any H, W >= 1).
        score_fn: 1 x C x crop x crop window -> 1 x K x crop x crop class scores.
        crop: window side in pixels.
        stride: step between windows in pixels (<= crop).

    Returns:
        K x H x W scores: at each pixel, the sum of the scores of the windows covering it divided by their
        number (the count map). The padding added to reach the crop is removed.
    """
    height, width = image.shape[-2:]
    pad_h, pad_w = max(crop - height, 0), max(crop - width, 0)
    padded = F.pad(image, (0, pad_w, 0, pad_h), value=PAD_VALUE) if pad_h or pad_w else image
    total, count = None, padded.new_zeros((1,) + tuple(padded.shape[-2:]))
    for y in window_starts(padded.shape[-2], crop, stride):
        for x in window_starts(padded.shape[-1], crop, stride):
            scores = score_fn(padded[None, :, y : y + crop, x : x + crop])[0]
            if total is None:
                total = scores.new_zeros((scores.shape[0],) + tuple(padded.shape[-2:]))
            total[:, y : y + crop, x : x + crop] += scores
            count[:, y : y + crop, x : x + crop] += 1
    return (total / count.to(total))[:, :height, :width]
