"""Mask2Former's pixel decoder: a multi-scale deformable-attention encoder over the coarse backbone
levels (res3..res5), then FPN steps down to the finest level (res2) and a 1x1 mask-feature conv."""
import math
from typing import Dict, List, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from torch import nn

from ..ops.ms_deform_attn import MSDeformAttn, check_impl
from ..registries import PIXEL_DECODER_REGISTRY
from .fpn import NUM_MULTI_SCALE_LEVELS, sorted_by_stride
from .position_encoding import PositionEmbeddingSine

__all__ = [
    "ENCODER_DIM_FEEDFORWARD",
    "ENCODER_N_POINTS",
    "OFFICIAL_UNREAD_ENCODER_KEYS",
    "MSDeformAttnEncoderLayer",
    "MSDeformAttnEncoder",
    "MSDeformAttnTransformerEncoderOnly",
    "MSDeformAttnPixelDecoder",
    "MSDeformAttnPixelDecoder4Scales",
    "MSDeformAttnPixelDecoder4ScalesFASeg",
    "POSITION_ENCODINGS",
]

# FFN width of the official deformable encoder; it is fixed there, not read from the config
# (MODEL.MASK_FORMER.DIM_FEEDFORWARD is the transformer decoder's).
ENCODER_DIM_FEEDFORWARD = 1024
# Sampling points per level and head of the official deformable encoder, also fixed there.
ENCODER_N_POINTS = 4
# Keys the official config declares for the encoder but never reads (its head count is
# MODEL.MASK_FORMER.NHEADS, its point count ENCODER_N_POINTS). Every official config dump carries them
# at these defaults, so they are accepted at these values only; any other value would be silently
# ignored by the original, so it is rejected here instead.
OFFICIAL_UNREAD_ENCODER_KEYS = {
    "DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS": 8,
    "DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS": ENCODER_N_POINTS,
}
# GroupNorm groups of the encoder input projections (official: GroupNorm(32, conv_dim)).
INPUT_PROJ_NUM_GROUPS = 32
# Position encodings of the encoder inputs and returned maps: fixed sine (Mask2Former), a learnable absolute
# grid per level, or conditional (PEG: a depth-wise conv on the projected features, FASeg).
POSITION_ENCODINGS = ("sine", "learnable", "conditional")
# Decoder levels FASeg reads: 1/32, 1/16, 1/8 from the encoder plus the 1/4 FPN output.
FASEG_NUM_MULTI_SCALE_LEVELS = 4
# Init std of learnable absolute position embeddings (ViT/DETR convention).
LEARNABLE_PE_INIT_STD = 0.02


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention, then a ReLU FFN, each with a residual."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, n_levels: int, n_heads: int,
                 n_points: int, impl: str = "auto"):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl=impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor) -> torch.Tensor:
        """
        Args:
            src: B x S x C tokens of all levels; pos: B x S x C position (+ level) embedding.
            reference_points: B x S x L x 2 normalised (x, y) of each token, per level.
            spatial_shapes: L x 2 (H_l, W_l); level_start_index: L.

        Returns:
            B x S x C.
        """
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnEncoder(nn.Module):
    """A stack of ``MSDeformAttnEncoderLayer`` (``layers.i``) sharing the token reference points."""

    def __init__(self, layers: Sequence[MSDeformAttnEncoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @staticmethod
    def reference_points(shapes: List[Tuple[int, int]], batch_size: int, num_levels: int,
                         device: torch.device) -> torch.Tensor:
        """Pixel centres of every token, normalised to [0, 1]: B x S x L x 2 (x, y).

        Without padding the normalised position is the same on every level.
        """
        points = []
        for h, w in shapes:
            ref_y, ref_x = torch.meshgrid(
                (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h,
                (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w,
                indexing="ij",
            )
            points.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
        points = torch.cat(points, 0)
        return points[None, :, None, :].expand(batch_size, -1, num_levels, -1)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, spatial_shapes: torch.Tensor,
                level_start_index: torch.Tensor) -> torch.Tensor:
        """src, pos: B x S x C; spatial_shapes: L x 2; level_start_index: L. Returns B x S x C."""
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        reference_points = self.reference_points(shapes, src.shape[0], len(shapes), src.device)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index)
        return src


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Deformable DETR's encoder alone: flattens the levels, adds ``level_embed`` to the position
    embedding, and runs ``encoder``."""

    def __init__(self, d_model: int, nhead: int, num_encoder_layers: int, dim_feedforward: int,
                 dropout: float, num_feature_levels: int, enc_n_points: int, impl: str = "auto"):
        super().__init__()
        self.d_model = d_model
        self.encoder = MSDeformAttnEncoder(
            [
                MSDeformAttnEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead,
                                         enc_n_points, impl=impl)
                for _ in range(num_encoder_layers)
            ]
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: List[torch.Tensor], pos_embeds: List[torch.Tensor]
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            srcs: L maps B x C x H_l x W_l; pos_embeds: L maps of the same shapes.

        Returns:
            memory: B x S x C encoder output (levels concatenated in the order of ``srcs``),
            spatial_shapes: L x 2 int64 (H_l, W_l), level_start_index: L int64.
        """
        src_flatten, pos_flatten, shapes = [], [], []
        for level, (src, pos) in enumerate(zip(srcs, pos_embeds)):
            shapes.append(src.shape[-2:])
            src_flatten.append(src.flatten(2).transpose(1, 2))
            pos_flatten.append(pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        pos_flatten = torch.cat(pos_flatten, 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src_flatten.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        memory = self.encoder(src_flatten, pos_flatten, spatial_shapes, level_start_index)
        return memory, spatial_shapes, level_start_index


def _check_unread_encoder_keys(head) -> None:
    """Reject MODEL.SEM_SEG_HEAD keys of ``OFFICIAL_UNREAD_ENCODER_KEYS`` set away from the official default."""
    changed = [f"MODEL.SEM_SEG_HEAD.{key} = {head[key]!r}" for key, default in OFFICIAL_UNREAD_ENCODER_KEYS.items()
               if head[key] != default]
    if changed:
        raise ValueError(
            f"{'; '.join(changed)}: as in the official Mask2Former, the deformable encoder of the pixel decoder "
            f"takes its head count from MODEL.MASK_FORMER.NHEADS and uses {ENCODER_N_POINTS} sampling points; these "
            f"keys are accepted only at their official defaults {OFFICIAL_UNREAD_ENCODER_KEYS} so that official "
            f"config dumps merge. Remove them from the config (set MODEL.MASK_FORMER.NHEADS for the head count)."
        )


@PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Deformable-attention encoder over ``transformer_in_features`` plus FPN steps to ``common_stride``.

    State-dict layout (official): ``input_proj.i`` (coarsest level first), ``transformer``,
    ``mask_features``, then ``adapter_i``/``layer_i`` for the FPN levels, fine to coarse.
    Subclasses may override ``position_embeddings`` (e.g. learned/conditional encodings).
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        transformer_dropout: float,
        transformer_nheads: int,
        transformer_dim_feedforward: int,
        transformer_enc_layers: int,
        transformer_n_points: int,
        conv_dim: int,
        mask_dim: int,
        norm: str,
        transformer_in_features: List[str],
        common_stride: int,
        ms_deform_attn_impl: str = "auto",
        num_multi_scale_levels: int = NUM_MULTI_SCALE_LEVELS,
        position_encoding: str = "sine",
        pos_kernel_size: int = 3,
        learnable_pe_size: int = 32,
    ):
        """
        Args:
            input_shape: backbone feature name -> ShapeSpec of every feature used (e.g. res2..res5).
            transformer_*: deformable encoder dropout, heads, FFN width, layers and points per level.
            conv_dim: channels of the encoder and FPN outputs.
            mask_dim: channels of the mask features.
            norm: detectron2 norm name of the FPN convs ("" for none, with bias).
            transformer_in_features: features fed to the encoder (e.g. res3, res4, res5).
            common_stride: stride of the mask features; FPN levels are added down to it.
            ms_deform_attn_impl: implementation of the deformable attention op ("auto", "compiled" or
                "pytorch"; MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTN_IMPL).
            num_multi_scale_levels: how many outputs, coarsest first, are returned for the decoder; more
                than the encoder levels appends FPN outputs (FASeg: 4, the last one at 1/4).
            position_encoding: one of ``POSITION_ENCODINGS``; used by the encoder and returned by
                ``forward_features_with_pos``. "conditional" adds ``pos_linear.i`` (depth-wise conv per level)
                and, for the FPN levels among the returned ones, an extra ``input_proj`` of that backbone
                feature whose PEG map is the level's encoding (official FASeg layout).
            pos_kernel_size: kernel of the conditional-PE convs.
            learnable_pe_size: side of each level's learnable PE grid (bilinearly resized to the map).
        """
        super().__init__()
        check_impl(ms_deform_attn_impl)
        shapes = sorted_by_stride(input_shape)
        self.in_features = [name for name, _ in shapes]
        encoder_shapes = [(name, spec) for name, spec in shapes if name in transformer_in_features]
        missing = sorted(set(transformer_in_features) - {name for name, _ in encoder_shapes})
        if missing:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES lists {missing}, which are not "
                f"among the pixel decoder inputs {self.in_features} (MODEL.SEM_SEG_HEAD.IN_FEATURES)."
            )
        # Encoder levels coarse to fine (res5, res4, res3), the order of input_proj and level_embed.
        self.transformer_in_features = [name for name, _ in encoder_shapes][::-1]
        self.transformer_num_feature_levels = len(encoder_shapes)
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(spec.channels, conv_dim, kernel_size=1),
                          nn.GroupNorm(INPUT_PROJ_NUM_GROUPS, conv_dim))
            for _, spec in encoder_shapes[::-1]
        )
        if position_encoding not in POSITION_ENCODINGS:
            raise ValueError(f"position_encoding (MODEL.DFPQ.POS_ENCODING) must be one of {POSITION_ENCODINGS}, "
                             f"got {position_encoding!r}.")
        self.position_encoding = position_encoding
        num_fpn_outputs = num_multi_scale_levels - self.transformer_num_feature_levels
        fpn_shapes = [(name, spec) for name, spec in shapes if name not in transformer_in_features][::-1]
        if num_fpn_outputs > len(fpn_shapes):
            raise ValueError(
                f"num_multi_scale_levels = {num_multi_scale_levels} needs {num_fpn_outputs} FPN levels below the "
                f"encoder, but only {[name for name, _ in fpn_shapes]} are pixel decoder inputs."
            )
        # Features of the returned FPN levels, coarse to fine (FASeg: res2).
        self.pos_proj_features = [name for name, _ in fpn_shapes[: max(0, num_fpn_outputs)]]
        if position_encoding == "conditional":
            for _, spec in fpn_shapes[: max(0, num_fpn_outputs)]:
                self.input_proj.append(nn.Sequential(nn.Conv2d(spec.channels, conv_dim, kernel_size=1),
                                                     nn.GroupNorm(INPUT_PROJ_NUM_GROUPS, conv_dim)))
            self.pos_linear = nn.ModuleList(
                nn.Conv2d(conv_dim, conv_dim, pos_kernel_size, padding=pos_kernel_size // 2, groups=conv_dim)
                for _ in range(len(self.input_proj))
            )
        elif position_encoding == "learnable":
            num_pos_levels = max(self.transformer_num_feature_levels, num_multi_scale_levels)
            self.pos_embed = nn.Parameter(torch.zeros(num_pos_levels, conv_dim, learnable_pe_size, learnable_pe_size))
            nn.init.trunc_normal_(self.pos_embed, std=LEARNABLE_PE_INIT_STD)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            nhead=transformer_nheads,
            num_encoder_layers=transformer_enc_layers,
            dim_feedforward=transformer_dim_feedforward,
            dropout=transformer_dropout,
            num_feature_levels=self.transformer_num_feature_levels,
            enc_n_points=transformer_n_points,
            impl=ms_deform_attn_impl,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1, stride=1, padding=0)
        weight_init.c2_xavier_fill(self.mask_features)
        self.num_multi_scale_levels = num_multi_scale_levels
        self.common_stride = common_stride

        # FPN levels finer than the encoder, down to common_stride (res2 for a ResNet).
        min_encoder_stride = min(spec.stride for _, spec in encoder_shapes)
        self.num_fpn_levels = max(0, round(math.log2(min_encoder_stride) - math.log2(common_stride)))
        use_bias = not norm
        lateral_convs, output_convs = [], []
        for idx, (_, spec) in enumerate(shapes[: self.num_fpn_levels]):
            lateral_conv = Conv2d(spec.channels, conv_dim, kernel_size=1, bias=use_bias,
                                  norm=get_norm(norm, conv_dim))
            output_conv = Conv2d(conv_dim, conv_dim, kernel_size=3, stride=1, padding=1, bias=use_bias,
                                 norm=get_norm(norm, conv_dim), activation=F.relu)
            weight_init.c2_xavier_fill(lateral_conv)
            weight_init.c2_xavier_fill(output_conv)
            self.add_module(f"adapter_{idx + 1}", lateral_conv)
            self.add_module(f"layer_{idx + 1}", output_conv)
            lateral_convs.append(lateral_conv)
            output_convs.append(output_conv)
        # Plain lists (registered above), coarse to fine as the top-down pass runs.
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        """The official mapping: the encoder's dropout and heads are MODEL.MASK_FORMER.DROPOUT and NHEADS
        (shared with the transformer decoder's keys), its FFN width and points are fixed."""
        head = cfg.MODEL.SEM_SEG_HEAD
        _check_unread_encoder_keys(head)
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "transformer_dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
            "transformer_nheads": cfg.MODEL.MASK_FORMER.NHEADS,
            "transformer_dim_feedforward": ENCODER_DIM_FEEDFORWARD,
            "transformer_enc_layers": head.TRANSFORMER_ENC_LAYERS,
            "transformer_n_points": ENCODER_N_POINTS,
            "transformer_in_features": head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES,
            "common_stride": head.COMMON_STRIDE,
            "ms_deform_attn_impl": head.DEFORMABLE_ATTN_IMPL,
        }

    def position_embeddings(self, srcs: List[torch.Tensor]) -> List[torch.Tensor]:
        """Position embedding of each projected encoder input: list of B x conv_dim x h x w."""
        if self.position_encoding == "conditional":
            return [conv(src) for conv, src in zip(self.pos_linear, srcs)]
        if self.position_encoding == "learnable":
            return [self._learned_pos(i, src) for i, src in enumerate(srcs)]
        return [self.pe_layer(src) for src in srcs]

    def _learned_pos(self, level: int, like: torch.Tensor) -> torch.Tensor:
        """Learnable PE grid of ``level`` resized to ``like`` (B x C x h x w) -> B x C x h x w."""
        pos = F.interpolate(self.pos_embed[level:level + 1], size=like.shape[-2:], mode="bilinear",
                            align_corners=False)
        return pos.expand(like.shape[0], -1, -1, -1)

    def forward_features_with_pos(
        self, features: Dict[str, torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
        """``forward_features`` plus the position encoding of every returned multi-scale level.

        Returns:
            mask_features, transformer_encoder_features, multi_scale_features (as ``forward_features``) and
            pos_embeddings: one B x conv_dim x H/s x W/s map per multi-scale level, coarse to fine. For
            "conditional", the FPN levels' maps come from the PEG conv on the projected backbone feature
            (e.g. res2), not from the FPN output.
        """
        return self._forward(features, with_pos=True)

    def forward_features(
        self, features: Dict[str, torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """
        Args:
            features: backbone outputs, name -> B x C_name x H/stride x W/stride.

        Returns:
            mask_features: B x mask_dim x H/common_stride x W/common_stride.
            transformer_encoder_features: B x conv_dim x H/s x W/s, encoder output of the coarsest level.
            multi_scale_features: the first ``num_multi_scale_levels`` outputs coarse to fine, each
                B x conv_dim x H/s x W/s (for a ResNet: strides 32, 16, 8).
        """
        return self._forward(features, with_pos=False)[:3]

    def _forward(self, features: Dict[str, torch.Tensor], with_pos: bool):
        """The pixel decoder pass; position maps of the returned levels only when ``with_pos``."""
        # Deformable attention runs in float32 (the official kernels have no half-precision path).
        device_type = next(iter(features.values())).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            srcs = [proj(features[name].float()) for name, proj in zip(self.transformer_in_features, self.input_proj)]
            encoder_pos = self.position_embeddings(srcs)
            memory, spatial_shapes, _ = self.transformer(srcs, encoder_pos)
            batch_size = memory.shape[0]
            shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
            out = [
                z.transpose(1, 2).reshape(batch_size, -1, h, w)
                for z, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=1), shapes)
            ]
            fpn_features = self.in_features[: self.num_fpn_levels][::-1]
            for name, lateral_conv, output_conv in zip(fpn_features, self.lateral_convs, self.output_convs):
                cur_fpn = lateral_conv(features[name].float())
                y = cur_fpn + F.interpolate(out[-1], size=cur_fpn.shape[-2:], mode="bilinear", align_corners=False)
                out.append(output_conv(y))
            multi_scale = out[: self.num_multi_scale_levels]
            pos = self._multi_scale_pos(features, encoder_pos, multi_scale) if with_pos else None
            return self.mask_features(out[-1]), out[0], multi_scale, pos

    def _multi_scale_pos(self, features: Dict[str, torch.Tensor], encoder_pos: List[torch.Tensor],
                         multi_scale: List[torch.Tensor]) -> List[torch.Tensor]:
        """Position maps of the returned levels (encoder levels reuse the encoder's own encodings)."""
        num_enc = self.transformer_num_feature_levels
        if self.position_encoding == "sine":
            return [self.pe_layer(x) for x in multi_scale]
        if self.position_encoding == "learnable":
            return [self._learned_pos(i, x) for i, x in enumerate(multi_scale)]
        extra = []
        for j, name in enumerate(self.pos_proj_features):
            proj = self.input_proj[num_enc + j](features[name].float())
            extra.append(self.pos_linear[num_enc + j](proj))
        return (list(encoder_pos) + extra)[: len(multi_scale)]

    def forward(self, features: Dict[str, torch.Tensor]):
        """Same as ``forward_features``; heads call ``forward_features`` directly."""
        return self.forward_features(features)


@PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder4Scales(MSDeformAttnPixelDecoder):
    """``MSDeformAttnPixelDecoder`` configured for FASeg: returns the 1/4 FPN output as a 4th multi-scale
    level (when ``MODEL.HRCA.ENABLED``) and position maps of type ``MODEL.DFPQ.POS_ENCODING`` (official FASeg:
    conditional PEG). Only ``from_config`` differs; use ``forward_features_with_pos`` to get the maps."""

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        args = super().from_config(cfg, input_shape)
        args["num_multi_scale_levels"] = (
            FASEG_NUM_MULTI_SCALE_LEVELS if cfg.MODEL.HRCA.ENABLED else NUM_MULTI_SCALE_LEVELS
        )
        args["position_encoding"] = cfg.MODEL.DFPQ.POS_ENCODING
        args["pos_kernel_size"] = cfg.MODEL.DFPQ.PEG_KERNEL_SIZE
        args["learnable_pe_size"] = cfg.MODEL.DFPQ.LEARNABLE_PE_SIZE
        return args


@PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder4ScalesFASeg(MSDeformAttnPixelDecoder4Scales):
    """The official FASeg registry name of ``MSDeformAttnPixelDecoder4Scales`` (so its configs build)."""
