"""Multi-scale deformable attention (Deformable DETR), behind one dispatch function.

Notation used in the shapes below:

* N: batch size, Lq: number of queries, S: number of value tokens (sum of H_l * W_l over levels),
* M: attention heads, D: channels per head, L: feature levels, P: sampling points per head and level.

``ms_deform_attn`` is the only entry point the model uses. It selects an implementation by name
(``MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTN_IMPL``):

* ``"auto"``: the compiled kernel of ``qsegformers._C`` (C++ for CPU tensors, CUDA for GPU tensors)
  when the extension is built for the tensors' device, else the pure-PyTorch path (logging one
  warning when the extension is missing);
* ``"compiled"``: the compiled kernel, or a RuntimeError saying how to build it;
* ``"pytorch"``: always the ``F.grid_sample`` reference path.

The compiled kernel is the torch custom op ``torch.ops.qsegformers.ms_deform_attn`` (schema and
device kernels registered in C++, autograd and fake kernel registered here), so torch.compile,
torch.export and torch.jit.trace see one op.
"""
import functools
import logging
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MS_DEFORM_ATTN_IMPLS",
    "check_impl",
    "compiled_kernel_available",
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
    "MSDeformAttn",
]

# Accepted values of MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTN_IMPL.
MS_DEFORM_ATTN_IMPLS = ("auto", "compiled", "pytorch")
_IMPL_CONFIG_KEY = "MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTN_IMPL"
_BUILD_HINT = (
    "Build it with `pip install --no-build-isolation -e .` in the repository (or `bash setup.sh`); "
    "CUDA kernels need a CUDA toolkit and a visible GPU or FORCE_CUDA=1 (see setup.py)."
)

logger = logging.getLogger(__name__)


def check_impl(impl: str) -> None:
    """Raise a ValueError naming the config key when ``impl`` is not a known implementation."""
    if impl not in MS_DEFORM_ATTN_IMPLS:
        raise ValueError(
            f"{_IMPL_CONFIG_KEY} = {impl!r} is not a multi-scale deformable attention implementation. "
            f"Choose one of: {', '.join(MS_DEFORM_ATTN_IMPLS)}."
        )


def _ms_deform_attn_setup_context(ctx, inputs, output) -> None:
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _ms_deform_attn_backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = torch.ops.qsegformers.ms_deform_attn_backward(
        grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return grad_value, None, None, grad_locations, grad_weights


@functools.lru_cache(maxsize=None)
def _register_python_parts() -> None:
    """Register autograd and the fake (meta) kernels of the ops that ``qsegformers._C`` defines (once)."""

    @torch.library.register_fake("qsegformers::ms_deform_attn")
    def _fake_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        n, _, m, d = value.shape
        return value.new_empty((n, sampling_locations.shape[1], m * d))

    @torch.library.register_fake("qsegformers::ms_deform_attn_backward")
    def _fake_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)

    torch.library.register_autograd(
        "qsegformers::ms_deform_attn", _ms_deform_attn_backward, setup_context=_ms_deform_attn_setup_context
    )


@functools.lru_cache(maxsize=None)
def _compiled_kernel() -> Optional[Callable]:
    """Return the compiled op ``torch.ops.qsegformers.ms_deform_attn``, or None when it is not built.

    Importing the optional extension ``qsegformers._C`` registers the op's schema and its CPU (and,
    when built with CUDA, GPU) kernels; autograd and the fake kernel are registered here once. The
    result is cached because a failed import would otherwise be retried on every call.
    """
    try:
        from qsegformers import _C  # noqa: F401  (optional compiled extension)
    except ImportError:
        return None
    _register_python_parts()
    return torch.ops.qsegformers.ms_deform_attn


@functools.lru_cache(maxsize=None)
def _compiled_kernel_has_cuda() -> bool:
    from qsegformers import _C

    return bool(getattr(_C, "WITH_CUDA", 0))


def compiled_kernel_available(device: torch.device = torch.device("cpu")) -> bool:
    """True when ``qsegformers._C`` is built with a kernel for ``device`` (CPU always, CUDA if compiled in)."""
    if _compiled_kernel() is None:
        return False
    device = torch.device(device)
    if device.type == "cpu":
        return True
    return device.type == "cuda" and _compiled_kernel_has_cuda()


@functools.lru_cache(maxsize=None)
def _warn_fallback_once(reason: str) -> None:
    logger.warning(
        "%s = 'auto' runs the slow pure-PyTorch multi-scale deformable attention: %s %s",
        _IMPL_CONFIG_KEY, reason, _BUILD_HINT,
    )


def ms_deform_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Reference implementation with ``F.grid_sample`` (bilinear, zero padding, align_corners=False).

    Args:
        value: N x S x M x D values, levels concatenated along S in the order of ``spatial_shapes``.
        spatial_shapes: L x 2 int64, (H_l, W_l) of each level. A level may be empty (H_l * W_l = 0):
            its samples are zeros, as in the compiled kernel.
        level_start_index: L int64, offset of each level in S. Unused here (levels are split by
            ``spatial_shapes``); kept so every implementation has one signature.
        sampling_locations: N x Lq x M x L x P x 2, (x, y) normalised to [0, 1] over each level's
            map; (0, 0) is the top-left corner of the top-left pixel. Points outside sample zeros.
        attention_weights: N x Lq x M x L x P weights of the sampled values.

    Returns:
        N x Lq x (M*D): per head, the weighted sum of the sampled values; heads concatenated.
    """
    del level_start_index
    n, s, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    sizes = [h * w for h, w in shapes]
    if s != sum(sizes):
        terms = " + ".join(f"{h}*{w}" for h, w in shapes) or "0"
        raise ValueError(
            f"ms_deform_attn: value has {s} positions but spatial_shapes sums to {sum(sizes)} (= {terms})"
        )
    value_per_level = value.split(sizes, dim=1)
    # grid_sample expects coordinates in [-1, 1].
    sampling_grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        if h * w == 0:
            # grid_sample rejects an empty map; every sample of it is zero (padding).
            sampled.append(value.new_zeros(n * m, d, lq, num_points))
            continue
        # N x HW x M x D -> (N*M) x D x H x W
        value_l = value_per_level[level].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        # N x Lq x M x P x 2 -> (N*M) x Lq x P x 2
        grid_l = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # (N*M) x D x Lq x P
        sampled.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # N x Lq x M x L x P -> (N*M) x 1 x Lq x (L*P)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * num_points)
    # (N*M) x D x Lq x (L*P) -> N x (M*D) x Lq
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return output.transpose(1, 2).contiguous()


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention core; see ``ms_deform_attn_pytorch`` for the shapes.

    Args:
        impl: ``"auto"`` (compiled kernel when built for the device, else the reference path with one
            logged warning), ``"compiled"`` (compiled kernel or RuntimeError) or ``"pytorch"``.

    Returns:
        N x Lq x (M*D).

    Raises:
        ValueError: inconsistent shapes, e.g. S differs from the sum of H_l * W_l, or (compiled kernel)
            ``level_start_index`` is not the exclusive cumulative sum of H_l * W_l.
        TypeError: (compiled kernel) wrong dtypes, e.g. ``spatial_shapes`` not int64.
    """
    check_impl(impl)
    if impl != "pytorch":
        device = value.device
        if compiled_kernel_available(device):
            kernel = _compiled_kernel()
            try:
                return kernel(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
            except (ValueError, TypeError) as err:
                # The kernel's argument checks: re-raised here so the traceback ends at the caller's
                # call instead of in torch's dispatcher frames; the message is the kernel's, unchanged.
                raise err.with_traceback(None) from None
        if _compiled_kernel() is None:
            reason = "the compiled extension qsegformers._C is not built."
        else:
            reason = f"qsegformers._C has no kernel for {device.type} tensors."
        if impl == "compiled":
            raise RuntimeError(f"{_IMPL_CONFIG_KEY} = 'compiled' but {reason} {_BUILD_HINT}")
        _warn_fallback_once(reason)
    return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module of Deformable DETR.

    Each query predicts, per head, level and point, a sampling offset (``sampling_offsets``) around its
    reference point and an attention weight (``attention_weights``, softmax over levels x points);
    values are projected (``value_proj``), sampled, weighted, and projected back (``output_proj``).
    Parameter names are those of the official implementation.
    """

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int, impl: str = "auto"):
        """
        Args:
            d_model: channels C of queries and values; must be divisible by ``n_heads``.
            n_levels: number of feature levels L.
            n_heads: attention heads M.
            n_points: sampling points P per head and level.
            impl: implementation of the core op (``MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTN_IMPL``), see
                ``ms_deform_attn``.
        """
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}).")
        check_impl(impl)
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.impl = impl
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR init: offsets start on a ring of M directions (point p at distance p+1),
        attention starts uniform (zero weights and bias), projections are Xavier with zero bias."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        # Scale each direction so its larger coordinate is 1 (a point on the unit square).
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: N x Lq x C queries (with their position embedding added).
            reference_points: N x Lq x L x 2, (x, y) in [0, 1] per level; or N x Lq x L x 4 boxes
                (cx, cy, w, h), in which case offsets are relative to half the box size.
            input_flatten: N x S x C values, levels concatenated (S = sum H_l * W_l).
            input_spatial_shapes: L x 2 int64, (H_l, W_l).
            input_level_start_index: L int64, offset of each level in S.
            input_padding_mask: optional N x S bool, True at padded positions (their values are zeroed).

        Returns:
            N x Lq x C.
        """
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        m, num_levels, num_points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(n, lq, m, num_levels, num_points, 2)
        weights = self.attention_weights(query).view(n, lq, m, num_levels * num_points)
        weights = F.softmax(weights, -1).view(n, lq, m, num_levels, num_points)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalise by (W_l, H_l).
            normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            locations = (
                reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / num_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points must end in 2 (points) or 4 (boxes), got shape {tuple(reference_points.shape)}."
            )
        output = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations, weights, self.impl)
        return self.output_proj(output)
