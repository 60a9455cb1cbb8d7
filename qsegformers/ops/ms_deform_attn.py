"""Multi-scale deformable attention (Deformable DETR), behind one dispatch function.

Notation used in the shapes below:

* N: batch size, Lq: number of queries, S: number of value tokens (sum of H_l * W_l over levels),
* M: attention heads, D: channels per head, L: feature levels, P: sampling points per head and level.

``ms_deform_attn`` is the only entry point the model uses. It selects an implementation by name
(``MODEL.SEM_SEG_HEAD.MS_DEFORM_ATTN_IMPL``): ``"pytorch"`` always runs the ``F.grid_sample``
reference path; ``"auto"`` runs the compiled kernel of ``qsegformers._C`` when that extension is built
and the tensors are on a GPU, and the reference path otherwise.
"""
import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MS_DEFORM_ATTN_IMPLS", "check_impl", "ms_deform_attn", "ms_deform_attn_pytorch", "MSDeformAttn"]

# Accepted values of MODEL.SEM_SEG_HEAD.MS_DEFORM_ATTN_IMPL.
MS_DEFORM_ATTN_IMPLS = ("auto", "pytorch")
_IMPL_CONFIG_KEY = "MODEL.SEM_SEG_HEAD.MS_DEFORM_ATTN_IMPL"


def check_impl(impl: str) -> None:
    """Raise a ValueError naming the config key when ``impl`` is not a known implementation."""
    if impl not in MS_DEFORM_ATTN_IMPLS:
        raise ValueError(
            f"{_IMPL_CONFIG_KEY} = {impl!r} is not a multi-scale deformable attention implementation. "
            f"Choose one of: {', '.join(MS_DEFORM_ATTN_IMPLS)}."
        )


@functools.lru_cache(maxsize=None)
def _compiled_kernel() -> Optional[Callable]:
    """Return the compiled multi-scale deformable attention op, or None when it is not built.

    The op comes from the optional C++/CUDA extension ``qsegformers._C`` (built by setup.py when a
    toolkit is present). It must be a callable with the signature and result of
    ``ms_deform_attn_pytorch`` (an autograd Function's ``apply``, so that it is differentiable), exposed
    as ``qsegformers._C.ms_deform_attn``. A missing extension is the normal pure-Python case, so it
    returns None silently; the result is cached because a failed import is retried on every call.
    """
    try:
        from qsegformers import _C  # noqa: F401  (optional compiled extension)
    except ImportError:
        return None
    return getattr(_C, "ms_deform_attn", None)


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
        spatial_shapes: L x 2 int64, (H_l, W_l) of each level.
        level_start_index: L int64, offset of each level in S. Unused here (levels are split by
            ``spatial_shapes``); kept so every implementation has one signature.
        sampling_locations: N x Lq x M x L x P x 2, (x, y) normalised to [0, 1] over each level's
            map; (0, 0) is the top-left corner of the top-left pixel. Points outside sample zeros.
        attention_weights: N x Lq x M x L x P weights of the sampled values.

    Returns:
        N x Lq x (M*D): per head, the weighted sum of the sampled values; heads concatenated.
    """
    del level_start_index
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample expects coordinates in [-1, 1].
    sampling_grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
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
        impl: ``"pytorch"`` (reference path) or ``"auto"`` (compiled kernel for GPU tensors when
            ``qsegformers._C`` is built, reference path otherwise).

    Returns:
        N x Lq x (M*D).
    """
    check_impl(impl)
    if impl == "auto" and value.is_cuda:
        kernel = _compiled_kernel()
        if kernel is not None:
            return kernel(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
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
            impl: implementation of the core op, see ``ms_deform_attn``.
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
