"""Plain ViT backbone (``D2ViT``): the token maps of chosen blocks, all at stride = patch size (SegViT).

Parameter names follow timm's ``VisionTransformer`` (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.<i>.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``), so a timm checkpoint
loads after ``tools/convert_timm_vit_to_d2.py``, which only drops the classifier. Differences from timm:

- only blocks ``1 .. max(OUT_BLOCKS)`` are built, so that every parameter receives a gradient; a
  checkpoint's deeper blocks are unused keys (detectron2 ignores them);
- ``norm`` exists only with ``final_norm=True``;
- the position embedding is resampled to the input grid with plain bicubic interpolation
  (``align_corners=False``, no antialiasing: mmseg's ``resize_pos_embed``, which SegViT trained with)
  rather than timm's antialiased bicubic.

Loading: a ``pos_embed`` stored for another grid is resampled by ``load_state_dict``; detectron2's
checkpointer instead drops a wrongly shaped one, which D2ViT turns into an error naming
MODEL.VIT.PRETRAIN_IMG_SIZE. ``D2PlainViT`` (the SegViT spec's name) is registered as an alias.
"""
import logging
import math
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as activation_checkpoint
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

from .layers import DropPath, Mlp

__all__ = ["D2ViT", "interpolate_pos_embed", "NUM_PREFIX_TOKENS"]

logger = logging.getLogger(__name__)

NUM_PREFIX_TOKENS = 1  # the class token, which timm's pos_embed also covers
LAYER_NORM_EPS = 1e-6  # timm's ViT LayerNorm epsilon; pretrained weights assume it
INIT_STD = 0.02  # trunc-normal std of timm's ViT initialisation
CLS_TOKEN_INIT_STD = 1e-6  # timm initialises the class token almost at zero


def interpolate_pos_embed(
    pos_embed: torch.Tensor, grid_hw: Tuple[int, int], num_prefix_tokens: int = NUM_PREFIX_TOKENS
) -> torch.Tensor:
    """Resample an absolute position embedding to another token grid.

    Args:
        pos_embed: 1 x (num_prefix_tokens + G*G) x D, a square G x G grid stored row-major after the
            prefix (class) tokens.
        grid_hw: (h, w) of the target grid.
        num_prefix_tokens: leading entries that are not on the grid; they are kept unchanged.
    Returns:
        1 x (num_prefix_tokens + h*w) x D; bicubic (align_corners=False) when the grid changes, the input
        itself when it does not.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    # int(): under tracing (fvcore's FLOP count) shape entries are tensors.
    num_grid = int(grid.shape[1])
    side = math.isqrt(num_grid)
    if side * side != num_grid:
        raise ValueError(f"pos_embed holds {num_grid} grid entries after the prefix, not a square grid")
    grid_hw = tuple(int(s) for s in grid_hw)
    if (side, side) == grid_hw:
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=grid_hw, mode="bicubic", align_corners=False)
    grid = grid.flatten(2).transpose(1, 2)
    return torch.cat([prefix, grid], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (timm name ``patch_embed.proj``)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x C x H x W (H, W multiples of the patch size) -> B x D x H/P x W/P."""
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm names ``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x N x D -> B x N x D."""
        batch, num_tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B x heads x N x head_dim
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, num_tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + DropPath(Attn(LN1 x))``, then ``x + DropPath(MLP(LN2 x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x N x D -> B x N x D."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


@BACKBONE_REGISTRY.register()
class D2ViT(Backbone):
    """Plain ViT returning ``{"blk<n>": B x D x ceil(H/P) x ceil(W/P)}`` for each 1-based n in out_blocks.

    The input is zero-padded on the right/bottom to a multiple of the patch size P (``size_divisibility``
    is P). The class token takes part in attention, as in timm, and is dropped from the outputs.
    ``forward_block`` runs one block and may change the token grid: a subclass (e.g. SegViT's Shrunk
    query down-sampling inside one block) overrides it without copying ``forward``.
    """

    @configurable
    def __init__(
        self,
        *,
        in_chans: int = 3,
        patch_size: int = 16,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        pretrain_img_size: int,
        out_blocks: Sequence[int],
        final_norm: bool = False,
        use_checkpoint: bool = False,
    ):
        """
        Args:
            in_chans: input image channels.
            patch_size: patch embedding kernel and stride P (the output stride).
            embed_dim: token width D.
            depth: blocks of the full (pretrained) model; the stochastic-depth schedule spans them.
            num_heads: attention heads.
            mlp_ratio: FFN hidden width / D.
            qkv_bias: bias on the qkv projection.
            drop_path_rate: stochastic depth of block ``depth``, linear from 0 at block 1.
            pretrain_img_size: image size whose (size/P)^2 grid ``pos_embed`` stores.
            out_blocks: 1-based block numbers whose token maps are returned; blocks after the deepest
                one are not built.
            final_norm: apply the final LayerNorm (``norm``) to the deepest returned block.
            use_checkpoint: recompute each block's activations in the backward pass (training only).
        """
        super().__init__()
        requested, out_blocks = list(out_blocks), sorted(set(int(b) for b in out_blocks))
        if not out_blocks or out_blocks[0] < 1 or out_blocks[-1] > depth:
            raise ValueError(
                f"out_blocks (MODEL.VIT.OUT_BLOCKS) = {requested} must be 1-based block numbers in [1, {depth}]"
            )
        if pretrain_img_size % patch_size:
            raise ValueError(
                f"pretrain_img_size (MODEL.VIT.PRETRAIN_IMG_SIZE) = {pretrain_img_size} is not a multiple "
                f"of the patch size {patch_size}"
            )
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.patch_size = patch_size
        self.out_blocks = out_blocks
        self.use_checkpoint = use_checkpoint
        pretrain_grid = pretrain_img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, NUM_PREFIX_TOKENS, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, NUM_PREFIX_TOKENS + pretrain_grid**2, embed_dim))
        drop_path_rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # timm's linspace
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path_rates[i]) for i in range(out_blocks[-1])
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS) if final_norm else None

        self._out_features = [f"blk{b}" for b in out_blocks]
        self._out_feature_channels = {name: embed_dim for name in self._out_features}
        self._out_feature_strides = {name: patch_size for name in self._out_features}
        self._init_weights()

    def _init_weights(self):
        """timm's ViT initialisation: trunc-normal linears and pos_embed, zero biases, tiny cls token."""
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)
        nn.init.normal_(self.cls_token, std=CLS_TOKEN_INIT_STD)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Resample a ``pos_embed`` stored for another grid; fail clearly when a loader dropped it.

        detectron2's checkpointer drops a ``pos_embed`` whose shape differs from the model's (a converted
        checkpoint whose grid is not PRETRAIN_IMG_SIZE / PATCH_SIZE) and would leave it random.
        """
        key = prefix + "pos_embed"
        if key in state_dict and state_dict[key].shape != self.pos_embed.shape:
            grid = int(round((self.pos_embed.shape[1] - NUM_PREFIX_TOKENS) ** 0.5))
            logger.info("Resampling %s from %s to a %dx%d grid", key, tuple(state_dict[key].shape), grid, grid)
            state_dict[key] = interpolate_pos_embed(state_dict[key], (grid, grid))
        elif key not in state_dict and prefix + "patch_embed.proj.weight" in state_dict:
            raise ValueError(
                f"The checkpoint has ViT weights but no usable {key}: its position-embedding grid differs "
                f"from this model's {tuple(self.pos_embed.shape)} (MODEL.VIT.PRETRAIN_IMG_SIZE / PATCH_SIZE). "
                "Set MODEL.VIT.PRETRAIN_IMG_SIZE to the size tools/convert_timm_vit_to_d2.py reported, or "
                "re-convert with --pretrain-img-size."
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        vit = cfg.MODEL.VIT
        return {
            "in_chans": input_shape.channels,
            "patch_size": vit.PATCH_SIZE,
            "embed_dim": vit.EMBED_DIM,
            "depth": vit.DEPTH,
            "num_heads": vit.NUM_HEADS,
            "mlp_ratio": vit.MLP_RATIO,
            "qkv_bias": vit.QKV_BIAS,
            "drop_path_rate": vit.DROP_PATH_RATE,
            "pretrain_img_size": vit.PRETRAIN_IMG_SIZE,
            "out_blocks": vit.OUT_BLOCKS,
            "final_norm": vit.FINAL_NORM,
            "use_checkpoint": vit.USE_CHECKPOINT,
        }

    @property
    def size_divisibility(self) -> int:
        return self.patch_size

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }

    def embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """B x C x H x W image -> (tokens B x (1 + h*w) x D with positions added, grid (h, w))."""
        pad_h, pad_w = (-x.shape[-2]) % self.patch_size, (-x.shape[-1]) % self.patch_size
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.patch_embed(x)
        grid_hw = (x.shape[-2], x.shape[-1])
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        return tokens + interpolate_pos_embed(self.pos_embed, grid_hw), grid_hw

    def forward_block(
        self, index: int, tokens: torch.Tensor, grid_hw: Tuple[int, int]
    ) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Run block ``index`` (0-based) on B x (1 + h*w) x D tokens; returns the tokens and their grid."""
        block = self.blocks[index]
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return activation_checkpoint.checkpoint(block, tokens, use_reentrant=False), grid_hw
        return block(tokens), grid_hw

    @staticmethod
    def tokens_to_map(tokens: torch.Tensor, grid_hw: Tuple[int, int]) -> torch.Tensor:
        """B x (1 + h*w) x D tokens -> B x D x h x w map without the class token."""
        grid = tokens[:, NUM_PREFIX_TOKENS:]
        return grid.transpose(1, 2).reshape(grid.shape[0], grid.shape[2], *grid_hw)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: B x C x H x W normalised images.
        Returns:
            ``{"blk<n>": B x D x ceil(H/P) x ceil(W/P)}`` for every n in ``out_blocks``.
        """
        tokens, grid_hw = self.embed(x)
        outputs = {}
        for index in range(len(self.blocks)):
            tokens, grid_hw = self.forward_block(index, tokens, grid_hw)
            number = index + 1
            if number in self.out_blocks:
                features = tokens
                if self.norm is not None and number == self.out_blocks[-1]:
                    features = self.norm(features)
                outputs[f"blk{number}"] = self.tokens_to_map(features, grid_hw)
        return outputs


def _build_plain_vit(cfg, input_shape: ShapeSpec) -> D2ViT:
    """``D2PlainViT``: the SegViT spec's registry name for ``D2ViT`` (same class)."""
    return D2ViT(cfg, input_shape)


_build_plain_vit.__name__ = "D2PlainViT"
BACKBONE_REGISTRY.register(_build_plain_vit)
