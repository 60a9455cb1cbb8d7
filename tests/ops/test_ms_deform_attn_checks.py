"""Argument checks of multi-scale deformable attention (qsegformers/ops/csrc/ms_deform_attn.h, shared by
the CPU and CUDA kernels; the length check of the PyTorch path), and the error the dispatch layer raises."""
import re

import pytest
import torch

from qsegformers.ops.ms_deform_attn import compiled_kernel_available, ms_deform_attn, ms_deform_attn_pytorch

from test_ms_deform_attn import _random_inputs

requires_compiled = pytest.mark.skipif(
    not compiled_kernel_available("cpu"), reason="qsegformers._C is not built (pip install -e .)"
)

# Two levels (S = 4*5 + 2*3 = 26), N = 2, Lq = 3, M = 2, D = 3, P = 2: sampling_locations is 2 x 3 x 2 x 2 x 2 x 2.
SHAPES = [(4, 5), (2, 3)]


def _inputs(device="cpu"):
    value, shapes, start, locations, weights = _random_inputs(SHAPES, dtype=torch.float32)
    return {
        "value": value.to(device),
        "spatial_shapes": shapes.to(device),
        "level_start_index": start.to(device),
        "sampling_locations": locations.to(device),
        "attention_weights": weights.to(device),
    }


def _exactly(message):
    """The whole message (a C++ backtrace may follow on the next line under TORCH_SHOW_CPP_STACKTRACES=1)."""
    return "^" + re.escape(message) + r"(\n|$)"


# (name, replacements of some inputs, exception type, the whole message).
BAD_INPUTS = [
    (
        "value_shorter_than_levels",
        {"value": torch.zeros(2, 20, 2, 3), "spatial_shapes": torch.tensor([[40, 50]]),
         "level_start_index": torch.tensor([0]), "sampling_locations": torch.rand(2, 3, 2, 1, 2, 2),
         "attention_weights": torch.rand(2, 3, 2, 1, 2)},
        ValueError,
        "ms_deform_attn: value has 20 positions but spatial_shapes sums to 2000 (= 40*50)",
    ),
    (
        "value_longer_than_levels",
        {"value": torch.zeros(2, 27, 2, 3)},
        ValueError,
        "ms_deform_attn: value has 27 positions but spatial_shapes sums to 26 (= 4*5 + 2*3)",
    ),
    (
        "level_start_index_not_the_cumsum",
        {"level_start_index": torch.tensor([0, 19])},
        ValueError,
        "ms_deform_attn: level_start_index must be the exclusive cumulative sum of H*W over spatial_shapes, "
        "[0, 20], got [0, 19]",
    ),
    (
        "level_start_index_inclusive_cumsum",
        {"level_start_index": torch.tensor([20, 26])},
        ValueError,
        "ms_deform_attn: level_start_index must be the exclusive cumulative sum of H*W over spatial_shapes, "
        "[0, 20], got [20, 26]",
    ),
    (
        "level_start_index_wrong_length",
        {"level_start_index": torch.tensor([0, 20, 26])},
        ValueError,
        "ms_deform_attn: level_start_index must have L = 2 entries (one per row of spatial_shapes), got shape [3]",
    ),
    (
        "level_start_index_int32",
        {"level_start_index": torch.tensor([0, 20], dtype=torch.int32)},
        TypeError,
        "ms_deform_attn: level_start_index must be int64, got Int",
    ),
    (
        "spatial_shapes_int32",
        {"spatial_shapes": torch.tensor(SHAPES, dtype=torch.int32)},
        TypeError,
        "ms_deform_attn: spatial_shapes must be int64, got Int",
    ),
    (
        "spatial_shapes_not_L_x_2",
        {"spatial_shapes": torch.tensor([4, 5, 2, 3])},
        ValueError,
        "ms_deform_attn: spatial_shapes must be L x 2 (H, W per level), got [4]",
    ),
    (
        "spatial_shapes_negative",
        # (-4) * (-5) + 2 * 3 = 26 would match the value length.
        {"spatial_shapes": torch.tensor([[-4, -5], [2, 3]])},
        ValueError,
        "ms_deform_attn: spatial_shapes must be non-negative, level 0 is -4 x -5",
    ),
    (
        "value_rank_3",
        {"value": torch.zeros(2, 26, 6)},
        ValueError,
        "ms_deform_attn: value must be N x S x M x D (4 dims), got [2, 26, 6]",
    ),
    (
        "value_integer",
        {"value": torch.zeros(2, 26, 2, 3, dtype=torch.long)},
        TypeError,
        "ms_deform_attn: value must be float32, float64, float16 or bfloat16, got Long",
    ),
    (
        "locations_wrong_levels",
        {"sampling_locations": torch.rand(2, 3, 2, 3, 2, 2)},
        ValueError,
        "ms_deform_attn: sampling_locations must be N x Lq x M x L x P x 2 with N = 2, M = 2 (from value) and "
        "L = 2 (from spatial_shapes), got [2, 3, 2, 3, 2, 2]",
    ),
    (
        "locations_wrong_heads",
        {"sampling_locations": torch.rand(2, 3, 4, 2, 2, 2)},
        ValueError,
        "ms_deform_attn: sampling_locations must be N x Lq x M x L x P x 2 with N = 2, M = 2 (from value) and "
        "L = 2 (from spatial_shapes), got [2, 3, 4, 2, 2, 2]",
    ),
    (
        "locations_wrong_batch",
        {"sampling_locations": torch.rand(1, 3, 2, 2, 2, 2)},
        ValueError,
        "ms_deform_attn: sampling_locations must be N x Lq x M x L x P x 2 with N = 2, M = 2 (from value) and "
        "L = 2 (from spatial_shapes), got [1, 3, 2, 2, 2, 2]",
    ),
    (
        "locations_three_coordinates",
        {"sampling_locations": torch.rand(2, 3, 2, 2, 2, 3)},
        ValueError,
        "ms_deform_attn: sampling_locations must be N x Lq x M x L x P x 2 with N = 2, M = 2 (from value) and "
        "L = 2 (from spatial_shapes), got [2, 3, 2, 2, 2, 3]",
    ),
    (
        "weights_wrong_points",
        {"attention_weights": torch.rand(2, 3, 2, 2, 4)},
        ValueError,
        "ms_deform_attn: attention_weights must be N x Lq x M x L x P = [2, 3, 2, 2, 2] (from sampling_locations), "
        "got [2, 3, 2, 2, 4]",
    ),
    (
        "weights_other_dtype",
        {"attention_weights": torch.rand(2, 3, 2, 2, 2, dtype=torch.float64)},
        TypeError,
        "ms_deform_attn: value, sampling_locations and attention_weights must have one dtype, got Float, Float and "
        "Double",
    ),
]


@requires_compiled
@pytest.mark.parametrize("replace, error, message", [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_compiled_cpu_kernels_reject_inconsistent_inputs(replace, error, message):
    args = {**_inputs(), **replace}
    # The op itself (forward and backward kernels), and through the dispatch function.
    with pytest.raises(error, match=_exactly(message)):
        torch.ops.qsegformers.ms_deform_attn(*args.values())
    grad_output = torch.zeros(2, 3, 6)
    with pytest.raises(error, match=_exactly(message)):
        torch.ops.qsegformers.ms_deform_attn_backward(grad_output, *args.values())
    with pytest.raises(error, match=_exactly(message)):
        ms_deform_attn(*args.values(), impl="compiled")


@requires_compiled
def test_compiled_kernel_accepts_empty_levels_and_repeated_starts():
    # Consistent inputs with empty levels: level_start_index repeats, the check must not reject it.
    value, shapes, start, locations, weights = _random_inputs([(0, 3), (4, 5), (2, 0), (0, 0)])
    assert start.tolist() == [0, 0, 20, 20]
    out = torch.ops.qsegformers.ms_deform_attn(value, shapes, start, locations, weights)
    assert out.shape == (2, 3, 2 * 3)


@requires_compiled
def test_backward_rejects_grad_output_of_wrong_shape():
    args = _inputs()
    with pytest.raises(ValueError, match=_exactly(
        "ms_deform_attn_backward: grad_output must be N x Lq x (M*D) = [2, 3, 6], got [2, 6, 3]"
    )):
        torch.ops.qsegformers.ms_deform_attn_backward(torch.zeros(2, 6, 3), *args.values())


@requires_compiled
@pytest.mark.parametrize("impl", ["compiled", "auto"])
def test_dispatch_error_is_one_message_raised_from_the_dispatch_function(impl):
    args = {**_inputs(), "level_start_index": torch.tensor([0, 19])}
    with pytest.raises(ValueError, match="exclusive cumulative sum") as excinfo:
        ms_deform_attn(*args.values(), impl=impl)
    # The traceback ends in ms_deform_attn (not in torch's dispatcher frames), with no chained exception.
    last = excinfo.traceback[-1]
    assert (last.path.name, last.name) == ("ms_deform_attn.py", "ms_deform_attn")
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__


def test_pytorch_path_rejects_value_of_wrong_length():
    args = {**_inputs(), "value": torch.zeros(2, 27, 2, 3)}
    with pytest.raises(ValueError, match=_exactly(
        "ms_deform_attn: value has 27 positions but spatial_shapes sums to 26 (= 4*5 + 2*3)"
    )):
        ms_deform_attn_pytorch(*args.values())


@pytest.mark.skipif(
    not (torch.cuda.is_available() and compiled_kernel_available("cuda")), reason="needs a GPU and the CUDA kernel"
)
def test_cuda_kernels_reject_inconsistent_inputs():
    # spatial_shapes and level_start_index on the GPU: the level check reads them back to the host.
    for _, replace, error, message in BAD_INPUTS:
        args = {key: t.cuda() for key, t in {**_inputs(), **replace}.items()}
        with pytest.raises(error, match=_exactly(message)):
            torch.ops.qsegformers.ms_deform_attn(*args.values())
        with pytest.raises(error, match=_exactly(message)):
            torch.ops.qsegformers.ms_deform_attn_backward(torch.zeros(2, 3, 6, device="cuda"), *args.values())
