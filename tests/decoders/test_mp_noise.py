"""MP-Former noise: GT downsampling, point / shift / scale mask noise and label flips (fixed seeds)."""
import math

import pytest
import torch

from qsegformers.decoders.mp_noise import downsample_gt, geometric_noise, label_noise, point_noise, resize_nearest

H = W = 32


def square(side, top=8, left=8, size=(H, W)):
    m = torch.zeros(size, dtype=torch.bool)
    m[top : top + side, left : left + side] = True
    return m


def test_area_any_keeps_a_single_pixel_that_nearest_loses():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 5, 6] = True  # falls in cell (1, 1) of a 2 x 2 grid; nearest samples pixels (0|4, 0|4)
    assert downsample_gt(mask, (2, 2), "area_any")[0].tolist() == [[False, False], [False, True]]
    assert not downsample_gt(mask, (2, 2), "nearest").any()
    half = torch.zeros(1, 8, 8, dtype=torch.bool)
    half[0, :, :2] = True  # covers half of cell column 0 -> bilinear value 0.5 there
    assert downsample_gt(half, (2, 2), "bilinear_0.5")[0].tolist() == [[True, False], [True, False]]


def test_point_noise_uniform_count_statistics():
    """Flips n ~ U{0..floor(0.2 a)} pixels of the whole map: n in range, mean about 0.2 a / 2."""
    torch.manual_seed(0)
    masks = square(10)[None].repeat(2000, 1, 1)  # a = 100 -> up to 20 flips
    noised = point_noise(masks, 0.2, "uniform_count")
    flips = (noised ^ masks).flatten(1).sum(-1).float()
    assert flips.min() == 0 and flips.max() == 20
    assert abs(flips.mean().item() - 10.0) < 0.5  # std of the mean: 6.06 / sqrt(2000) = 0.14
    # positions are uniform over the map: most flips land in the background (924 of 1024 pixels)
    background = ((noised & ~masks).flatten(1).sum(-1).float().sum() / flips.sum()).item()
    assert abs(background - 924 / 1024) < 0.02
    # the fraction of changed pixels of the map is (0.2 * a / 2) / (h * w)
    assert abs((noised ^ masks).float().mean().item() - 10.0 / 1024) < 0.0005


def test_point_noise_bernoulli_mean_and_zero_ratio():
    torch.manual_seed(0)
    masks = square(10)[None].repeat(2000, 1, 1)
    flips = (point_noise(masks, 0.2, "bernoulli") ^ masks).flatten(1).sum(-1).float()
    assert abs(flips.mean().item() - 20.0) < 0.5  # expected count 0.2 * a
    assert torch.equal(point_noise(masks, 0.0, "uniform_count"), masks)
    empty = torch.zeros(3, H, W, dtype=torch.bool)
    assert not point_noise(empty, 0.2, "uniform_count").any()  # a = 0 -> no flip


def test_point_noise_rejects_unknown_mode():
    with pytest.raises(ValueError, match="point-noise mode"):
        point_noise(square(4)[None], 0.2, "gaussian")


def offsets_of_square(mask, side):
    """(top, left) of a mask that must be exactly a side x side square."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    top, left = ys.min().item(), xs.min().item()
    assert torch.equal(mask, square(side, top, left))
    return top, left


def test_shift_noise_translates_within_half_the_box():
    """Shift scale 1: the 12 x 12 square moves by |d| <= 6 per axis, unchanged in shape; mean |d| = 3."""
    torch.manual_seed(0)
    side, n = 12, 400
    masks = square(side, 10, 10)[None].repeat(n, 1, 1)
    shifted = geometric_noise(masks, shift_scale=1.0)
    d = torch.tensor([offsets_of_square(m, side) for m in shifted], dtype=torch.float32) - 10
    assert d.abs().max() <= side / 2
    assert abs(d.abs().mean().item() - side / 4) < 0.3
    # changed fraction of the mask pixels: 2 (1 - overlap / area) for each shift, averaged
    overlap = (side - d[:, 0].abs()) * (side - d[:, 1].abs())
    expected = (2 * (1 - overlap / side**2)).mean().item()
    changed = ((shifted ^ masks).flatten(1).sum(-1).float() / side**2).mean().item()
    assert changed == pytest.approx(expected, abs=1e-6)
    # E|d| = side / 4 per axis, independent: 2 (1 - (3/4)^2) = 0.875 of the mask area changes on average
    assert abs(changed - 0.875) < 0.05


def test_scale_noise_about_the_box_centre():
    """Scale 0.5 on a 10 x 10 square: side in [5, 15], centred; mean area ratio about E[f^2] = 1 + 0.5^2/3."""
    torch.manual_seed(0)
    n = 400
    masks = square(10, 11, 11)[None].repeat(n, 1, 1)  # centre (15.5, 15.5)
    scaled = geometric_noise(masks, scale_scale=0.5)
    areas = scaled.flatten(1).sum(-1).float()
    assert areas.min() >= 4**2 and areas.max() <= 16**2
    assert abs((areas / 100).mean().item() - (1 + 0.25 / 3)) < 0.06
    ys = torch.arange(H, dtype=torch.float32)
    centre_y = (scaled.any(-1).float() * ys).sum(-1) / scaled.any(-1).sum(-1)
    assert (centre_y - 15.5).abs().max() <= 1.0


def test_geometric_noise_leaves_empty_masks_and_zero_scales_unchanged():
    masks = torch.stack([square(6), torch.zeros(H, W, dtype=torch.bool)])
    assert torch.equal(geometric_noise(masks, 0.0, 0.0), masks)
    assert not geometric_noise(masks, 1.0, 0.5)[1].any()


def test_resize_nearest_keeps_leading_dims():
    masks = torch.zeros(2, 3, 8, 8, dtype=torch.bool)
    masks[1, 2, :4, :4] = True
    small = resize_nearest(masks, (2, 2))
    assert small.shape == (2, 3, 2, 2) and small[1, 2].tolist() == [[True, False], [False, False]]
    assert small.sum() == 1


def test_label_noise_fractions():
    torch.manual_seed(0)
    num_classes, n = 10, 20000
    labels = torch.full((n,), 3, dtype=torch.int64)
    assert torch.equal(label_noise(labels, 0.0, num_classes), labels)
    # ratio 0.2: a flip draws the true class again with probability 1/K -> 0.2 * 0.9 labels change
    changed = (label_noise(labels, 0.2, num_classes) != labels).float().mean().item()
    assert abs(changed - 0.18) < 0.01
    # ratio 1: uniform over K (chi-square with K-1 = 9 dof; 27.9 is its 0.999 quantile)
    counts = torch.bincount(label_noise(labels, 1.0, num_classes), minlength=num_classes).float()
    expected = n / num_classes
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 27.9 and not math.isnan(chi2)
