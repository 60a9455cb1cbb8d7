"""Swin Transformer backbone (``D2SwinTransformer``) with the official Mask2Former parameter names.

Stages can carry an optional module applied between their blocks and their patch merging (the
extension point SeMask uses, see ``semask.py``); plain Swin registers none, so its state dict is exactly
the official one: ``patch_embed``, ``layers.{i}.blocks.{j}.*``, ``layers.{i}.downsample.*``, ``norm0..3``.
"""
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as activation_checkpoint
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import Tensor, nn

from .layers import DropPath, Mlp

__all__ = ["SwinTransformer", "D2SwinTransformer", "BasicLayer", "window_partition", "window_reverse", "PRIOR_PREFIX"]


INIT_STD = 0.02  # trunc_normal std of Linear weights and position tables (official Swin)
ATTN_MASK_VALUE = -100.0  # logit added between tokens of different shifted sub-windows (official Swin)
SIZE_DIVISIBILITY = 32  # total stride of the 4 stages
# Key prefix of auxiliary stage outputs (e.g. SeMask priors "sem_res2"), returned in training only.
PRIOR_PREFIX = "sem_"
DEFAULT_DEPTHS = (2, 2, 6, 2)  # Swin-T
DEFAULT_WINDOW_SIZE = 7  # Swin-T/S

# A stage extension: (tokens B x HW x C, H, W) -> (tokens B x HW x C, auxiliary map B x K x H x W or None).
StageExtensionFactory = Callable[[int, int], Optional[nn.Module]]


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """B x H x W x C (H, W multiples of window_size) -> (B * nW) x window_size x window_size x C."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)


def window_reverse(windows: Tensor, window_size: int, height: int, width: int) -> Tensor:
    """(B * nW) x window_size x window_size x C -> B x height x width x C (inverse of window_partition)."""
    b = windows.shape[0] // ((height // window_size) * (width // window_size))
    x = windows.view(b, height // window_size, width // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, height, width, -1)


def pad_to_windows(x: Tensor, window_size: int) -> Tensor:
    """Zero-pad B x H x W x C at the bottom/right to multiples of window_size."""
    pad_b = (window_size - x.shape[1] % window_size) % window_size
    pad_r = (window_size - x.shape[2] % window_size) % window_size
    return F.pad(x, (0, 0, 0, pad_r, 0, pad_b)) if pad_b or pad_r else x


def relative_position_index(window_size: int) -> Tensor:
    """n x n (n = window_size**2) int64 index into the (2M-1)^2 relative position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window_size - 1
    rel[:, :, 1] += window_size - 1
    rel[:, :, 0] *= 2 * window_size - 1
    return rel.sum(-1)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside M x M windows with a learned relative position bias."""

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=INIT_STD)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x: (B * nW) x n x C; mask: nW x n x n additive (0 / ATTN_MASK_VALUE) or None."""
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(x))


class SwinTransformerBlock(nn.Module):
    """Pre-norm (shifted) window attention + MLP block on B x HW x C tokens."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: Optional[float],
        drop: float,
        attn_drop: float,
        drop_path: float,
    ):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"Swin shift_size {shift_size} must be in [0, window_size={window_size})")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: Tensor, height: int, width: int, attn_mask: Optional[Tensor]) -> Tensor:
        """x: B x HW x C; attn_mask: the stage's shifted-window mask (used only if shift_size > 0)."""
        b, _, c = x.shape
        shortcut = x
        x = pad_to_windows(self.norm1(x).view(b, height, width, c), self.window_size)
        hp, wp = x.shape[1:3]
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        else:
            attn_mask = None
        windows = window_partition(x, self.window_size).reshape(-1, self.window_size**2, c)
        windows = self.attn(windows, mask=attn_mask).view(-1, self.window_size, self.window_size, c)
        x = window_reverse(windows, self.window_size, hp, wp)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = x[:, :height, :width, :].reshape(b, height * width, c)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat -> LN(4C) -> Linear(4C -> 2C, no bias): B x HW x C -> B x ceil(H/2)ceil(W/2) x 2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        b, _, c = x.shape
        x = x.view(b, height, width, c)
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # Order (h, w): (0,0), (1,0), (0,1), (1,1), as in the official checkpoints.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


def shifted_window_mask(height: int, width: int, window_size: int, shift_size: int, device) -> Tensor:
    """nW x n x n additive mask that keeps attention inside each cyclically shifted sub-window."""
    hp = -(-height // window_size) * window_size
    wp = -(-width // window_size) * window_size
    img_mask = torch.zeros((1, hp, wp, 1), device=device)
    spans = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    for region, (hs, ws) in enumerate((h, w) for h in spans for w in spans):
        img_mask[:, hs, ws, :] = region
    ids = window_partition(img_mask, window_size).reshape(-1, window_size * window_size)
    mask = ids.unsqueeze(1) - ids.unsqueeze(2)
    return mask.masked_fill(mask != 0, ATTN_MASK_VALUE).masked_fill(mask == 0, 0.0)


class BasicLayer(nn.Module):
    """One Swin stage: ``blocks`` -> optional ``semantic_layer`` -> optional ``downsample`` (PatchMerging).

    ``semantic_layer`` (the extension point) maps (B x HW x C, H, W) to (B x HW x C, aux or None); it is
    registered only when given, between the blocks and the downsample, as in SeMask's official layout.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: Optional[float],
        drop: float,
        attn_drop: float,
        drop_path: Sequence[float],
        downsample: bool,
        use_checkpoint: bool = False,
        semantic_layer: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                num_heads,
                window_size,
                0 if i % 2 == 0 else self.shift_size,
                mlp_ratio,
                qkv_bias,
                qk_scale,
                drop,
                attn_drop,
                drop_path[i],
            )
            for i in range(depth)
        )
        self.semantic_layer = semantic_layer  # a registered child only when it is a module
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor, height: int, width: int) -> Tuple[Tensor, Tensor, int, int, Optional[Tensor]]:
        """x: B x HW x C. Returns (stage output B x HW x C, next-stage input, next H, next W, aux map or None)."""
        attn_mask = shifted_window_mask(height, width, self.window_size, self.shift_size, x.device).to(x.dtype)
        for blk in self.blocks:
            if self.use_checkpoint and self.training:
                x = activation_checkpoint.checkpoint(blk, x, height, width, attn_mask, use_reentrant=False)
            else:
                x = blk(x, height, width, attn_mask)
        aux = None
        if self.semantic_layer is not None:
            x, aux = self.semantic_layer(x, height, width)
        if self.downsample is None:
            return x, x, height, width, aux
        return x, self.downsample(x, height, width), (height + 1) // 2, (width + 1) // 2, aux


class PatchEmbed(nn.Module):
    """Image B x 3 x H x W -> B x C x ceil(H/p) x ceil(W/p) with a p x p stride-p conv (+ optional LN)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, patch_norm: bool):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        h, w = x.shape[-2:]
        if h % p or w % p:
            x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
        x = self.proj(x)
        if self.norm is not None:
            hh, ww = x.shape[-2:]
            x = self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).view(-1, x.shape[1], hh, ww)
        return x


def _init_weights(module: nn.Module) -> None:
    """Official Swin init: Linear trunc_normal(0.02) with zero bias; LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class SwinTransformer(nn.Module):
    """Hierarchical Swin encoder. ``forward(x: B x 3 x H x W)`` returns {"res2".."res5": B x C_i x H/s_i x W/s_i}
    (each after its per-stage LayerNorm ``norm{i}``), plus, in training, ``"sem_res{i+2}"`` for every stage
    whose extension returns an auxiliary map."""

    def __init__(
        self,
        *,
        pretrain_img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = DEFAULT_DEPTHS,
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = DEFAULT_WINDOW_SIZE,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        ape: bool = False,
        patch_norm: bool = True,
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        use_checkpoint: bool = False,
        stage_extension: Optional[StageExtensionFactory] = None,
    ):
        """
        Args:
            pretrain_img_size: image size of the pre-training; sizes the absolute position embedding.
            drop_path_rate: stochastic depth of the last block; it grows linearly from 0 over all blocks.
            ape: add a learned absolute position embedding (interpolated bicubically to the input grid).
            out_features: subset of res2..res5 to return.
            use_checkpoint: recompute block activations in backward (torch.utils.checkpoint), training only.
            stage_extension: (stage index, stage width) -> module inserted between the stage's blocks and
                its patch merging, or None (see :class:`BasicLayer`).
        """
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"MODEL.SWIN.DEPTHS {list(depths)} and NUM_HEADS {list(num_heads)} differ in length")
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.ape = ape
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        if ape:
            grid = pretrain_img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=INIT_STD)
        self.pos_drop = nn.Dropout(p=drop_rate)

        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.num_features = [int(embed_dim * 2**i) for i in range(self.num_layers)]
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            self.layers.append(
                BasicLayer(
                    dim=self.num_features[i],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    downsample=i < self.num_layers - 1,
                    use_checkpoint=use_checkpoint,
                    semantic_layer=stage_extension(i, self.num_features[i]) if stage_extension else None,
                )
            )
        for i in range(self.num_layers):
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.apply(_init_weights)

        self._out_features = list(out_features)
        self._stage_names = [f"res{i + 2}" for i in range(self.num_layers)]
        unknown = [f for f in self._out_features if f not in self._stage_names]
        if unknown:
            raise ValueError(f"MODEL.SWIN.OUT_FEATURES has unknown names {unknown}; choose from {self._stage_names}")
        self._out_feature_strides = {name: patch_size * 2**i for i, name in enumerate(self._stage_names)}
        self._out_feature_channels = dict(zip(self._stage_names, self.num_features))

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        x = self.patch_embed(x)
        height, width = x.shape[-2:]
        if self.ape:
            pos = F.interpolate(self.absolute_pos_embed, size=(height, width), mode="bicubic", align_corners=False)
            x = x + pos
        x = self.pos_drop(x.flatten(2).transpose(1, 2))
        outs = {}
        for i, (name, layer) in enumerate(zip(self._stage_names, self.layers)):
            x_out, x, next_h, next_w, aux = layer(x, height, width)
            if name in self._out_features:
                x_out = getattr(self, f"norm{i}")(x_out)
                outs[name] = x_out.view(-1, height, width, self.num_features[i]).permute(0, 3, 1, 2).contiguous()
            if aux is not None and self.training:
                outs[PRIOR_PREFIX + name] = aux
            height, width = next_h, next_w
        return outs


class _D2SwinMixin(Backbone):
    """detectron2 Backbone contract shared by the Swin variants."""

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        return SIZE_DIVISIBILITY


def swin_kwargs_from_config(cfg) -> Dict:
    """Constructor arguments of :class:`SwinTransformer` from ``MODEL.SWIN.*``."""
    sw = cfg.MODEL.SWIN
    return {
        "pretrain_img_size": sw.PRETRAIN_IMG_SIZE,
        "patch_size": sw.PATCH_SIZE,
        "in_chans": len(cfg.MODEL.PIXEL_MEAN),
        "embed_dim": sw.EMBED_DIM,
        "depths": list(sw.DEPTHS),
        "num_heads": list(sw.NUM_HEADS),
        "window_size": sw.WINDOW_SIZE,
        "mlp_ratio": sw.MLP_RATIO,
        "qkv_bias": sw.QKV_BIAS,
        "qk_scale": sw.QK_SCALE,
        "drop_rate": sw.DROP_RATE,
        "attn_drop_rate": sw.ATTN_DROP_RATE,
        "drop_path_rate": sw.DROP_PATH_RATE,
        "ape": sw.APE,
        "patch_norm": sw.PATCH_NORM,
        "out_features": list(sw.OUT_FEATURES),
        "use_checkpoint": sw.USE_CHECKPOINT,
    }


@BACKBONE_REGISTRY.register()
class D2SwinTransformer(SwinTransformer, _D2SwinMixin):
    """Swin backbone under its official Mask2Former registry name; config ``MODEL.SWIN.*``."""

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        return swin_kwargs_from_config(cfg)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """x: B x 3 x H x W (any size; padded internally). Returns res2..res5 (+ sem_* in training)."""
        if x.dim() != 4:
            raise ValueError(f"D2SwinTransformer takes B x C x H x W input, got shape {tuple(x.shape)}")
        return super().forward(x)
