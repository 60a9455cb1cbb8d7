"""SeMask-Swin (``D2SeMaskSwinTransformer``): a Swin backbone with a semantic layer in every stage.

The semantic layer sits between a stage's Swin blocks and its patch merging (the stage extension point
of :class:`~qsegformers.backbones.swin.BasicLayer`). It returns the semantically masked features, which
feed both the decoder (through ``norm{i}``) and the next stage, and the stage's semantic-prior logits,
which the backbone returns as ``sem_res{i+2}`` (B x K x H_i x W_i) in training only. Parameter names follow
the official SeMask-Mask2Former code: ``layers.{i}.semantic_layer.{norm1, class_injection.{j}.*}``.
"""
from typing import Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from torch import Tensor, nn

from .swin import (
    DEFAULT_DEPTHS,
    DEFAULT_WINDOW_SIZE,
    SwinTransformer,
    _D2SwinMixin,
    pad_to_windows,
    swin_kwargs_from_config,
    window_partition,
    window_reverse,
)
from .swin_config import SEMASK_NUM_SEM_BLOCKS_DEFAULT, SEMASK_SEM_WINDOW_SIZE_DEFAULT, resolve_compat_key

__all__ = ["SeMaskBlock", "SemanticLayer", "D2SeMaskSwinTransformer", "SEMASK_INITS"]


# "trunc_normal": every Linear trunc_normal(0.02) (the Swin init pass, as in the mmseg code), so the update
# path can learn; "d2_official": kaiming q/k/v and W_O = b_O = 0 as in SeMask's detectron2 code, where
# lambda = 0 and W_O = 0 keep the update path frozen (spec §2.3).
SEMASK_INITS = ("trunc_normal", "d2_official")
GAMMA_INIT = 0.0  # lambda starts at 0: the layer starts as LN_sem(Y)


class SeMaskBlock(nn.Module):
    """Single-head semantic attention on windows: Z + lambda * Dropout(W_O softmax(S_Q S_K^T) V).

    Input Z: N x n x C (N windows of n tokens). Returns (Z', S_Q) with S_Q: N x n x K prior logits.
    """

    def __init__(self, dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((1,), GAMMA_INIT))
        self.mlp_cls_q = nn.Linear(dim, num_classes)
        self.mlp_cls_k = nn.Linear(dim, num_classes)
        self.mlp_v = nn.Linear(dim, dim)
        self.mlp_res = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, z: Tensor) -> Tuple[Tensor, Tensor]:
        s_q = self.mlp_cls_q(z)
        attn = (s_q @ self.mlp_cls_k(z).transpose(-2, -1)).softmax(dim=-1)  # no scaling (paper Eq. 2)
        update = self.proj_drop(self.mlp_res(attn @ self.mlp_v(z)))
        return z + self.gamma * update, s_q

    def reset_d2_official(self) -> None:
        """SeMask detectron2 init: kaiming-normal q/k/v weights, zero output projection."""
        for linear in (self.mlp_cls_q, self.mlp_cls_k, self.mlp_v):
            nn.init.kaiming_normal_(linear.weight)
            nn.init.zeros_(linear.bias)
        nn.init.zeros_(self.mlp_res.weight)
        nn.init.zeros_(self.mlp_res.bias)
        nn.init.constant_(self.gamma, GAMMA_INIT)


class SemanticLayer(nn.Module):
    """LN_sem, then ``num_blocks`` SeMask blocks in non-overlapping windows (no shift) or globally.

    ``forward(y: B x HW x C, H, W)`` returns (Z: B x HW x C, prior: B x K x H x W). Windows are zero-padded
    at the bottom/right and the padded tokens take part as unmasked keys (official behaviour), then cropped.
    """

    def __init__(self, dim: int, num_classes: int, num_blocks: int, window_size: int, global_attention: bool, dropout: float):
        """window_size: semantic window M; ignored when ``global_attention`` (one window of H x W tokens)."""
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"SemanticLayer needs at least one block, got {num_blocks}")
        self.window_size = window_size
        self.global_attention = global_attention
        self.num_classes = num_classes
        self.norm1 = nn.LayerNorm(dim)
        self.class_injection = nn.ModuleList(SeMaskBlock(dim, num_classes, dropout) for _ in range(num_blocks))

    def forward(self, y: Tensor, height: int, width: int) -> Tuple[Tensor, Tensor]:
        b, _, c = y.shape
        z = self.norm1(y)
        if self.global_attention:
            for blk in self.class_injection:
                z, s_q = blk(z)
            return z, s_q.transpose(1, 2).reshape(b, self.num_classes, height, width)
        m = self.window_size
        z = pad_to_windows(z.view(b, height, width, c), m)
        hp, wp = z.shape[1:3]
        z = window_partition(z, m).reshape(-1, m * m, c)
        for blk in self.class_injection:
            z, s_q = blk(z)
        z = window_reverse(z.view(-1, m, m, c), m, hp, wp)[:, :height, :width].reshape(b, height * width, c)
        prior = window_reverse(s_q.view(-1, m, m, self.num_classes), m, hp, wp)[:, :height, :width]
        return z, prior.permute(0, 3, 1, 2).contiguous()

    def extra_repr(self) -> str:
        return f"window_size={'global' if self.global_attention else self.window_size}"


@BACKBONE_REGISTRY.register()
class D2SeMaskSwinTransformer(SwinTransformer, _D2SwinMixin):
    """Swin with a SeMask semantic layer per stage. Returns res2..res5 like :class:`D2SwinTransformer`
    and, in training only, ``sem_res2..sem_res5`` (B x K x H_i x W_i prior logits); ``output_shape()``
    lists only res2..res5."""

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        num_sem_blocks: Sequence[int] = SEMASK_NUM_SEM_BLOCKS_DEFAULT,
        sem_window_size: int = SEMASK_SEM_WINDOW_SIZE_DEFAULT,
        global_stages: Sequence[int] = (4,),
        sem_dropout: float = 0.1,
        semask_init: str = "trunc_normal",
        **swin_kwargs,
    ):
        """
        Args:
            num_classes: K, width of the semantic queries/keys and of the priors.
            num_sem_blocks: SeMask blocks per stage; 0 leaves that stage without a semantic layer.
            sem_window_size: semantic attention window (0: the Swin window size).
            global_stages: 1-based stages whose semantic attention is global (no windows).
            sem_dropout: dropout after each block's output projection.
            semask_init: one of SEMASK_INITS.
            swin_kwargs: arguments of :class:`SwinTransformer`.
        """
        num_stages = len(swin_kwargs.get("depths", DEFAULT_DEPTHS))
        if len(num_sem_blocks) != num_stages:
            raise ValueError(f"MODEL.SEMASK.NUM_SEM_BLOCKS {list(num_sem_blocks)} needs one entry per stage ({num_stages})")
        bad_stages = [s for s in global_stages if not 1 <= s <= num_stages]
        if bad_stages:
            raise ValueError(f"MODEL.SEMASK.GLOBAL_STAGES has stages {bad_stages} outside 1..{num_stages}")
        if semask_init not in SEMASK_INITS:
            raise ValueError(f"MODEL.SEMASK.INIT = {semask_init!r}; choose one of {SEMASK_INITS}")
        window = sem_window_size or swin_kwargs.get("window_size", DEFAULT_WINDOW_SIZE)

        def semantic_layer(stage: int, dim: int) -> Optional[nn.Module]:
            if num_sem_blocks[stage] == 0:
                return None
            return SemanticLayer(dim, num_classes, num_sem_blocks[stage], window, stage + 1 in global_stages, sem_dropout)

        super().__init__(stage_extension=semantic_layer, **swin_kwargs)
        if semask_init == "d2_official":
            for module in self.modules():
                if isinstance(module, SeMaskBlock):
                    module.reset_d2_official()

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        sm = cfg.MODEL.SEMASK
        num_stages = len(cfg.MODEL.SWIN.DEPTHS)
        num_sem_blocks = resolve_compat_key(
            cfg, "MODEL.SWIN.NUM_SEM_BLOCKS", "MODEL.SEMASK.NUM_SEM_BLOCKS", list(SEMASK_NUM_SEM_BLOCKS_DEFAULT),
            to_canonical=lambda n: [n] * num_stages,
        )
        sem_window_size = resolve_compat_key(
            cfg, "MODEL.SWIN.SEM_WINDOW_SIZE", "MODEL.SEMASK.SEM_WINDOW_SIZE", SEMASK_SEM_WINDOW_SIZE_DEFAULT
        )
        return {
            **swin_kwargs_from_config(cfg),
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "num_sem_blocks": num_sem_blocks,
            "sem_window_size": sem_window_size,
            "global_stages": list(sm.GLOBAL_STAGES),
            "sem_dropout": sm.DROPOUT,
            "semask_init": sm.INIT,
        }

    def forward(self, x: Tensor):
        """x: B x 3 x H x W. Returns res2..res5, plus sem_res2..sem_res5 in training."""
        if x.dim() != 4:
            raise ValueError(f"D2SeMaskSwinTransformer takes B x C x H x W input, got shape {tuple(x.shape)}")
        return super().forward(x)
