"""Tests of qsegformers/ops/ms_deform_attn.py: the PyTorch path against a naive loop, gradients,
the dispatch, and the MSDeformAttn module."""
import math

import pytest
import torch

from qsegformers.ops.ms_deform_attn import (
    MSDeformAttn,
    ms_deform_attn,
    ms_deform_attn_pytorch,
)


def _level_start_index(spatial_shapes):
    return torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))


def _random_inputs(shapes, n=2, lq=3, m=2, d=3, p=2, dtype=torch.float64, low=-0.25, high=1.25, seed=0):
    """Random op inputs; sampling locations span [low, high] so some points fall outside the map."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    s = int(spatial_shapes.prod(1).sum())
    num_levels = len(shapes)
    value = torch.randn(n, s, m, d, generator=gen, dtype=dtype)
    locations = low + (high - low) * torch.rand(n, lq, m, num_levels, p, 2, generator=gen, dtype=dtype)
    weights = torch.rand(n, lq, m, num_levels, p, generator=gen, dtype=dtype)
    return value, spatial_shapes, _level_start_index(spatial_shapes), locations, weights


def _naive_ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights):
    """Explicit bilinear sampling, zero outside the map, align_corners=False pixel convention:
    normalised x maps to pixel coordinate x * W - 0.5 (pixel centres at integers)."""
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = locations.shape
    out = torch.zeros(n, lq, m, d, dtype=value.dtype)
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                for level in range(num_levels):
                    h, w = (int(v) for v in spatial_shapes[level])
                    start = int(level_start_index[level])
                    for pt in range(num_points):
                        x = float(locations[b, q, head, level, pt, 0]) * w - 0.5
                        y = float(locations[b, q, head, level, pt, 1]) * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        fx, fy = x - x0, y - y0
                        sample = torch.zeros(d, dtype=value.dtype)
                        for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
                            for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
                                if 0 <= yy < h and 0 <= xx < w:
                                    sample += wy * wx * value[b, start + yy * w + xx, head]
                        out[b, q, head] += weights[b, q, head, level, pt] * sample
    return out.reshape(n, lq, m * d)


def test_pytorch_path_matches_naive_loop():
    inputs = _random_inputs([(4, 5), (2, 3), (1, 1)])
    # Some points really are outside the map.
    assert ((inputs[3] < 0) | (inputs[3] > 1)).any()
    expected = _naive_ms_deform_attn(*inputs)
    actual = ms_deform_attn_pytorch(*inputs)
    assert actual.shape == (2, 3, 2 * 3)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_pytorch_path_empty_levels_sample_zeros():
    # Levels with H*W == 0 (F.grid_sample rejects an empty map): their samples are zeros.
    inputs = _random_inputs([(4, 5), (0, 3), (2, 0), (0, 0), (1, 2)])
    out = ms_deform_attn_pytorch(*inputs)
    torch.testing.assert_close(out, _naive_ms_deform_attn(*inputs), rtol=1e-10, atol=1e-10)
    # Same as dropping the empty levels.
    value, _, _, locations, weights = inputs
    kept = [0, 4]
    shapes = torch.tensor([(4, 5), (1, 2)])
    without_empty = ms_deform_attn_pytorch(
        value, shapes, _level_start_index(shapes), locations[:, :, :, kept], weights[:, :, :, kept]
    )
    torch.testing.assert_close(out, without_empty, rtol=1e-12, atol=1e-12)


def test_points_far_outside_sample_zero():
    value, shapes, start, locations, weights = _random_inputs([(3, 3)], low=1.5, high=2.0)
    out = ms_deform_attn_pytorch(value, shapes, start, locations, weights)
    assert torch.count_nonzero(out) == 0


def test_pixel_centre_samples_that_pixel():
    value, shapes, start, _, _ = _random_inputs([(3, 4)], n=1, m=1, d=2)
    # Centre of pixel (row 1, col 2) of a 3 x 4 map, one point, weight 1.
    locations = torch.tensor([(2 + 0.5) / 4, (1 + 0.5) / 3], dtype=value.dtype).view(1, 1, 1, 1, 1, 2)
    weights = torch.ones(1, 1, 1, 1, 1, dtype=value.dtype)
    out = ms_deform_attn_pytorch(value, shapes, start, locations, weights)
    torch.testing.assert_close(out[0, 0], value[0, 1 * 4 + 2, 0])


def test_gradcheck_pytorch_path():
    value, shapes, start, locations, weights = _random_inputs([(2, 3), (1, 2)], n=1, lq=2, m=2, d=2, p=2)
    value.requires_grad_(True)
    locations.requires_grad_(True)
    weights.requires_grad_(True)

    def fn(v, loc, w):
        return ms_deform_attn_pytorch(v, shapes, start, loc, w)

    assert torch.autograd.gradcheck(fn, (value, locations, weights), eps=1e-6, atol=1e-5)


def test_auto_equals_pytorch_on_cpu():
    inputs = _random_inputs([(4, 5), (2, 3)], dtype=torch.float32)
    torch.testing.assert_close(ms_deform_attn(*inputs, impl="auto"), ms_deform_attn_pytorch(*inputs))
    torch.testing.assert_close(ms_deform_attn(*inputs, impl="pytorch"), ms_deform_attn_pytorch(*inputs))


def test_unknown_impl_raises_with_config_key():
    inputs = _random_inputs([(2, 2)])
    with pytest.raises(ValueError, match=r"MODEL\.SEM_SEG_HEAD\.DEFORMABLE_ATTN_IMPL.*auto, compiled, pytorch"):
        ms_deform_attn(*inputs, impl="cuda_magic")
    with pytest.raises(ValueError, match=r"DEFORMABLE_ATTN_IMPL"):
        MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=1, impl="nope")


def test_module_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=10, n_levels=1, n_heads=4, n_points=1)


def test_module_parameters_and_init():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    shapes = {k: tuple(v.shape) for k, v in attn.state_dict().items()}
    assert shapes == {
        "sampling_offsets.weight": (4 * 2 * 3 * 2, 16),
        "sampling_offsets.bias": (4 * 2 * 3 * 2,),
        "attention_weights.weight": (4 * 2 * 3, 16),
        "attention_weights.bias": (4 * 2 * 3,),
        "value_proj.weight": (16, 16),
        "value_proj.bias": (16,),
        "output_proj.weight": (16, 16),
        "output_proj.bias": (16,),
    }
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.bias) == 0
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # Head 0 points along +x, head 1 (90 degrees) along +y; point p lies at distance p + 1.
    torch.testing.assert_close(bias[0, 1], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))
    torch.testing.assert_close(bias[1, 0], torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]]), atol=1e-6, rtol=0)


def test_module_forward_shape_and_padding_mask():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2, impl="pytorch")
    spatial_shapes = torch.tensor([[4, 4], [2, 2]])
    start = _level_start_index(spatial_shapes)
    value = torch.randn(2, 20, 16)
    query = torch.randn(2, 5, 16)
    reference_points = torch.rand(2, 5, 2, 2)
    out = attn(query, reference_points, value, spatial_shapes, start)
    assert out.shape == (2, 5, 16)
    boxes = torch.cat([reference_points, torch.full_like(reference_points, 0.3)], -1)
    assert attn(query, boxes, value, spatial_shapes, start).shape == (2, 5, 16)
    # Masking every token zeroes the sampled values: only the output bias is left.
    masked = attn(query, reference_points, value, spatial_shapes, start, torch.ones(2, 20, dtype=torch.bool))
    torch.testing.assert_close(masked, attn.output_proj.bias.expand(2, 5, 16))
    with pytest.raises(ValueError, match="reference_points"):
        attn(query, torch.rand(2, 5, 2, 3), value, spatial_shapes, start)
