"""Tests of qsegformers/losses/mask_losses.py: point sampling, importance sampling, mask losses."""
import math

import pytest
import torch
import torch.nn.functional as F

from qsegformers.losses.mask_losses import (
    batch_dice_cost,
    batch_sigmoid_ce_cost,
    calculate_uncertainty,
    dice_loss,
    get_uncertain_point_coords_with_randomness,
    point_sample,
    sigmoid_ce_loss,
    sigmoid_focal_loss,
)

ROW_STEP = 10.0  # ramp image value = column + ROW_STEP * row


def _ramp(height, width):
    rows = torch.arange(height, dtype=torch.float64)[:, None]
    cols = torch.arange(width, dtype=torch.float64)[None, :]
    return (cols + ROW_STEP * rows)[None, None]  # 1 x 1 x H x W


def test_point_sample_ramp_matches_hand_bilinear():
    height, width = 5, 7
    image = _ramp(height, width)
    # Interior points (between the first and last pixel centres): bilinear is exact on a ramp.
    # align_corners=False: x in [0,1] maps to pixel coordinate x * W - 0.5.
    points = torch.tensor([[[0.5, 0.5], [0.25, 0.7], [0.9, 0.15], [1.5 / width, 2.5 / height]]], dtype=torch.float64)
    expected = (points[0, :, 0] * width - 0.5) + ROW_STEP * (points[0, :, 1] * height - 0.5)
    out = point_sample(image, points, align_corners=False)
    assert out.shape == (1, 1, 4)
    torch.testing.assert_close(out[0, 0], expected)
    # The last point sits on the centre of pixel (row 2, col 1).
    assert out[0, 0, 3].item() == pytest.approx(1 + ROW_STEP * 2)


def test_point_sample_equals_grid_sample_and_defaults_to_align_corners_false():
    torch.manual_seed(0)
    image = torch.randn(2, 3, 6, 9)
    points = torch.rand(2, 11, 2)
    direct = F.grid_sample(image, 2 * points[:, :, None] - 1, align_corners=False)[..., 0]
    torch.testing.assert_close(point_sample(image, points, align_corners=False), direct)
    torch.testing.assert_close(point_sample(image, points), direct)
    grid = torch.rand(2, 4, 5, 2)
    out = point_sample(image, grid, align_corners=False)
    assert out.shape == (2, 3, 4, 5)
    torch.testing.assert_close(out, F.grid_sample(image, 2 * grid - 1, align_corners=False))


def test_point_sample_at_pixel_centres_is_pixel_lookup():
    torch.manual_seed(1)
    height, width = 4, 6
    image = torch.randn(2, 3, height, width)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    points = torch.stack([(cols.flatten() + 0.5) / width, (rows.flatten() + 0.5) / height], dim=-1)
    out = point_sample(image, points[None].expand(2, -1, -1), align_corners=False)
    torch.testing.assert_close(out, image.flatten(2))


def test_calculate_uncertainty():
    logits = torch.tensor([[[-3.0, 0.0, 2.0]]])
    torch.testing.assert_close(calculate_uncertainty(logits), torch.tensor([[[-3.0, 0.0, -2.0]]]))
    with pytest.raises(ValueError, match="one channel"):
        calculate_uncertainty(torch.zeros(1, 2, 3))


@pytest.mark.parametrize("importance", [0.0, 0.75, 1.0])
def test_importance_sampler_shape_and_range(importance):
    logits = torch.randn(3, 1, 8, 8)
    coords = get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, 20, 3.0, importance)
    assert coords.shape == (3, 20, 2)
    assert coords.dtype == logits.dtype
    assert coords.min() >= 0 and coords.max() <= 1


def test_importance_sampler_picks_most_uncertain_points():
    num, num_points, ratio = 2, 10, 4.0
    # Logits that vary across the image, so uncertainty differs from point to point.
    logits = torch.cat([_ramp(6, 6).float() - 20.0, 30.0 - _ramp(6, 6).float()])
    torch.manual_seed(3)
    coords = get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, num_points, ratio, 1.0)
    torch.manual_seed(3)
    candidates = torch.rand(num, int(num_points * ratio), 2)
    uncertainty = calculate_uncertainty(point_sample(logits, candidates, align_corners=False))[:, 0]
    for i in range(num):
        chosen = torch.isclose(candidates[i][:, None], coords[i][None]).all(-1).any(-1)
        assert chosen.sum() == num_points
        assert uncertainty[i][chosen].min() >= uncertainty[i][~chosen].max()


def test_importance_sampler_rejects_bad_ratios():
    logits = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="oversample_ratio"):
        get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, 4, 0.5, 0.5)
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, 4, 3.0, 1.5)


LOG3 = math.log(3.0)  # sigmoid(log 3) = 0.75


def test_dice_loss_hand_values():
    inputs = torch.tensor([[0.0, 0.0], [LOG3, LOG3]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # mask 0: p = (.5, .5): 1 - (2 * .5 + 1) / (1 + 1 + 1) = 1/3
    # mask 1: p = (.75, .75): 1 - (2 * 1.5 + 1) / (1.5 + 2 + 1) = 1/9
    assert dice_loss(inputs, targets, 2).item() == pytest.approx((1 / 3 + 1 / 9) / 2)
    # Two empty masks agree perfectly.
    assert dice_loss(torch.full((1, 4), -1e4), torch.zeros(1, 4), 1).item() == pytest.approx(0.0)


def test_sigmoid_ce_loss_hand_values():
    inputs = torch.tensor([[0.0, LOG3], [LOG3, LOG3]])
    targets = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    mask0 = (math.log(2) - math.log(0.75)) / 2
    mask1 = (-math.log(0.25) - math.log(0.75)) / 2
    assert sigmoid_ce_loss(inputs, targets, 4).item() == pytest.approx((mask0 + mask1) / 4)


def test_sigmoid_focal_loss_hand_values_and_reduces_to_bce():
    inputs = torch.tensor([[0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0]])
    # p_t = .5 for both; positives weighted alpha, negatives 1 - alpha.
    expected = math.log(2) * 0.5**2 * (0.25 + 0.75) / 2
    assert sigmoid_focal_loss(inputs, targets, 1, alpha=0.25, gamma=2.0).item() == pytest.approx(expected)
    torch.manual_seed(0)
    x, t = torch.randn(3, 7), (torch.rand(3, 7) > 0.5).float()
    torch.testing.assert_close(sigmoid_focal_loss(x, t, 3, alpha=-1, gamma=0.0), sigmoid_ce_loss(x, t, 3))


def test_losses_accept_spatial_masks():
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 5), (torch.rand(2, 4, 5) > 0.5).float()
    torch.testing.assert_close(dice_loss(x, t, 2), dice_loss(x.flatten(1), t.flatten(1), 2))
    torch.testing.assert_close(sigmoid_ce_loss(x, t, 2), sigmoid_ce_loss(x.flatten(1), t.flatten(1), 2))


def test_batch_costs_equal_pairwise_losses():
    torch.manual_seed(0)
    inputs = torch.randn(5, 30, dtype=torch.float64)
    targets = (torch.rand(3, 30) > 0.5).double()
    dice, bce = batch_dice_cost(inputs, targets), batch_sigmoid_ce_cost(inputs, targets)
    assert dice.shape == bce.shape == (5, 3)
    for q in range(5):
        for t in range(3):
            pair = (inputs[q : q + 1], targets[t : t + 1])
            torch.testing.assert_close(dice[q, t], dice_loss(*pair, 1))
            torch.testing.assert_close(bce[q, t], sigmoid_ce_loss(*pair, 1))
