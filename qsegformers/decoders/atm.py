"""SegViT's Attention-to-Mask (ATM) decoders (spec: shared/specs/segvit.md, sections 2.2-2.7).

One learnable token per class (query k = class k, ``FixedMatcher``). In every ATM layer, the similarity
between the class tokens and the image tokens drives the cross-attention and, averaged over the heads,
is that class's mask logit. Class logits have K+1 columns (the last is "no object"); inference is the
softmax-head ``sum_q p_q[c] sigmoid(m_q)``.

* :class:`ATMDecoder`: the cascade on a plain ViT. Stage s reads feature s (deepest block first), the
  class tokens flow from stage to stage, and stage s predicts the sum of the mask logits of stages 1..s.
* :class:`ATMShrunkDecoder`: the Shrunk structure's head. Query-based up-sampling (QU) rebuilds a fixed
  (crop / 16)^2 token map from the backbone features, then one ATM stage runs on it; each of its layers is
  a supervised prediction, masks are not accumulated.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.config import configurable
from torch import Tensor, nn

from ..registries import TRANSFORMER_DECODER_REGISTRY
from .atm_layers import ATMStage, QueryUpsampler, TokenProjection, repeat_tokens, resize_like
from .base import QueryDecoder
from .segvit_config import DEFAULT_CUMULATIVE_MASKS, DEFAULT_LAYERS_PER_STAGE

__all__ = ["ATMDecoder", "ATMShrunkDecoder"]


class _ClassTokenHead(QueryDecoder):
    """The class tokens (one per class) and the (K+1)-way class embedding shared by every prediction."""

    class_activation = "softmax"  # K+1 columns, the last one is "no object"
    matcher_name = "FixedMatcher"  # query k <-> class k
    criterion_name = "ATMCriterion"

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.class_tokens = nn.Embedding(num_classes, dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)

    def prediction(self, tokens: Tensor, masks: Tensor, stage_masks: Tensor) -> Dict[str, Tensor]:
        """tokens: K x B x D. Returns ``pred_logits`` B x K x (K+1), ``pred_masks`` and ``stage_masks``
        (B x K x h x w: the supervised mask logits and the stage's own similarity logits)."""
        logits = self.class_embed(tokens.transpose(0, 1))
        return {"pred_logits": logits, "pred_masks": masks, "stage_masks": stage_masks}


@TRANSFORMER_DECODER_REGISTRY.register()
class ATMDecoder(_ClassTokenHead):
    """The ATM cascade.

    Output dict: ``pred_logits`` B x K x (K+1) and ``pred_masks`` B x K x h x w (cumulative mask logits at the
    resolution of the last stage's feature) of the last stage; ``stage_masks`` the last stage's own mask
    logits; ``aux_outputs`` the same keys for stages 1..S-1.
    """

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        num_classes: int,
        embed_dim: int,
        num_heads: int,
        num_stages: int,
        layers_per_stage: int,
        ffn_ratio: int,
        dropout: float,
        use_input_proj: bool = True,
        cumulative_masks: bool = True,
    ):
        """
        Args:
            in_channels: width of the backbone features (the identity pixel decoder's CONVS_DIM).
            mask_classification: must be True.
            num_classes: K, also the number of class tokens.
            embed_dim: decoder width D.
            num_heads: heads of every attention.
            num_stages: ATM stages, one per input feature.
            layers_per_stage: ATM layers per stage; the last one gives the stage's prediction.
            ffn_ratio: FFN hidden width / D.
            dropout: dropout of the attention weights and residual branches.
            use_input_proj: ``LayerNorm(Linear)`` per stage; without it in_channels must equal embed_dim.
            cumulative_masks: stage s predicts ``sum_{t<=s} M_t`` (False: only ``M_s``).
        """
        if not mask_classification:
            raise ValueError("ATMDecoder only supports mask classification.")
        if num_stages < 1:
            raise ValueError(f"MODEL.ATM.NUM_STAGES must be >= 1, got {num_stages}")
        if not use_input_proj and in_channels != embed_dim:
            raise ValueError(
                f"MODEL.ATM.USE_INPUT_PROJ is False, so the features' width {in_channels} "
                f"(MODEL.SEM_SEG_HEAD.CONVS_DIM) must equal MODEL.ATM.EMBED_DIM {embed_dim}"
            )
        super().__init__(num_classes, embed_dim)
        self.num_stages = num_stages
        self.cumulative_masks = cumulative_masks
        self.input_proj = (
            nn.ModuleList(TokenProjection(in_channels, embed_dim) for _ in range(num_stages))
            if use_input_proj
            else None
        )
        self.stages = nn.ModuleList(
            ATMStage(
                dim=embed_dim,
                num_heads=num_heads,
                ffn_dim=ffn_ratio * embed_dim,
                dropout=dropout,
                num_layers=layers_per_stage,
            )
            for _ in range(num_stages)
        )

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification=True):
        atm = cfg.MODEL.ATM
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "embed_dim": atm.EMBED_DIM,
            "num_heads": atm.NUM_HEADS,
            "num_stages": len(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES),
            "layers_per_stage": atm.LAYERS_PER_STAGE,
            "ffn_ratio": atm.FFN_RATIO,
            "dropout": atm.DROPOUT,
            "use_input_proj": atm.USE_INPUT_PROJ,
            "cumulative_masks": atm.CUMULATIVE_MASKS,
        }

    def memory(self, stage: int, x: Tensor) -> Tensor:
        """B x C x h x w feature -> (h*w) x B x D tokens of stage ``stage``."""
        if self.input_proj is not None:
            return self.input_proj[stage](x)
        return x.flatten(2).permute(2, 0, 1)

    def forward(
        self,
        features: Sequence[Tensor],
        mask_features: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        targets: Optional[List[Dict]] = None,
    ) -> Dict:
        """features: one B x C x h_s x w_s map per stage, in stage order (deepest ViT block first).
        ``mask_features``, ``mask`` and ``targets`` are accepted for the decoder contract and unused."""
        if len(features) != self.num_stages:
            raise ValueError(
                f"ATMDecoder has {self.num_stages} stages but got {len(features)} features "
                "(MODEL.SEM_SEG_HEAD.IN_FEATURES, deepest block first)"
            )
        tokens = repeat_tokens(self.class_tokens, features[0].shape[0])
        predictions, cumulative = [], None
        for s, (stage, x) in enumerate(zip(self.stages, features)):
            tokens, stage_masks = stage(tokens, self.memory(s, x), tuple(x.shape[-2:]))[-1]
            if self.cumulative_masks and cumulative is not None:
                cumulative = resize_like(cumulative, tuple(stage_masks.shape[-2:])) + stage_masks
            else:
                cumulative = stage_masks
            predictions.append(self.prediction(tokens, cumulative, stage_masks))
        out = dict(predictions[-1])
        out["aux_outputs"] = predictions[:-1]
        return out


@TRANSFORMER_DECODER_REGISTRY.register()
class ATMShrunkDecoder(_ClassTokenHead):
    """QU followed by one ATM stage whose every layer is a prediction.

    Output dict: ``pred_logits`` B x K x (K+1) and ``pred_masks`` B x K x gh x gw of the last ATM layer
    (``stage_masks`` is the same tensor); ``aux_outputs`` the earlier layers. (gh, gw) is the QU query
    grid, fixed by the training crop: run inference on crops of that size (TEST.SLIDING_WINDOW). Built from a
    config, it raises a ValueError on any other input size instead of stretching the grid's masks over it.
    """

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        num_classes: int,
        embed_dim: int,
        num_heads: int,
        ffn_ratio: int,
        dropout: float,
        num_features: int,
        qu_layers_per_stage: int,
        atm_layers: int,
        grid_hw: Tuple[int, int],
        use_input_proj: bool = True,
        input_size: Optional[Tuple[int, int]] = None,
        input_stride: Optional[int] = None,
    ):
        """
        Args:
            in_channels: width of the backbone features.
            num_classes, embed_dim, num_heads, ffn_ratio, dropout: as in :class:`ATMDecoder`.
            num_features: backbone features decoded by QU, in order (SegViT: early 1/16, last 1/32).
            qu_layers_per_stage: decoder layers of each QU stage.
            atm_layers: layers of the ATM stage (= number of predictions).
            grid_hw: QU query grid (crop / stride).
            use_input_proj: ``LayerNorm(Linear)`` of each QU input; without it in_channels must equal embed_dim.
            input_size: (H, W) of the (padded) input the grid was built for, the training crop; with
                ``input_stride``, any other input size is a ValueError. None: no check.
            input_stride: stride in pixels of the first feature (SegViT: the patch size of the pre-QD block).
        """
        if not mask_classification:
            raise ValueError("ATMShrunkDecoder only supports mask classification.")
        if not use_input_proj and in_channels != embed_dim:
            raise ValueError(
                f"MODEL.ATM.USE_INPUT_PROJ is False, so the QU inputs' width {in_channels} "
                f"(MODEL.SEM_SEG_HEAD.CONVS_DIM) must equal MODEL.ATM.EMBED_DIM {embed_dim}"
            )
        super().__init__(num_classes, embed_dim)
        self.grid_hw = tuple(grid_hw)
        self.input_size = None if input_size is None else tuple(input_size)
        self.input_stride = input_stride
        ffn_dim = ffn_ratio * embed_dim
        self.upsampler = QueryUpsampler(
            in_channels=[in_channels] * num_features,
            dim=embed_dim,
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            dropout=dropout,
            layers_per_stage=qu_layers_per_stage,
            grid_hw=self.grid_hw,
            use_input_proj=use_input_proj,
        )
        self.stage = ATMStage(
            dim=embed_dim, num_heads=num_heads, ffn_dim=ffn_dim, dropout=dropout, num_layers=atm_layers
        )

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification=True):
        atm, shrunk = cfg.MODEL.ATM, cfg.MODEL.SHRUNK
        crop = cfg.INPUT.CROP
        if crop.TYPE != "absolute" or any(s % shrunk.QU_QUERY_STRIDE for s in crop.SIZE):
            raise ValueError(
                "ATMShrunkDecoder derives its query grid from the training crop: INPUT.CROP.TYPE must be "
                f"'absolute' and INPUT.CROP.SIZE {tuple(crop.SIZE)} multiples of MODEL.SHRUNK.QU_QUERY_STRIDE "
                f"{shrunk.QU_QUERY_STRIDE}"
            )
        # The cascade's keys have no meaning for the single QU + ATM stage: refuse changed values.
        unused = {
            "MODEL.ATM.LAYERS_PER_STAGE": (atm.LAYERS_PER_STAGE, DEFAULT_LAYERS_PER_STAGE,
                                           "set the ATM stage's layers with MODEL.SHRUNK.ATM_LAYERS and the QU "
                                           "stages' with MODEL.SHRUNK.QU_LAYERS_PER_STAGE"),
            "MODEL.ATM.CUMULATIVE_MASKS": (atm.CUMULATIVE_MASKS, DEFAULT_CUMULATIVE_MASKS,
                                           "the Shrunk head has one ATM stage, so there are no earlier stages' "
                                           "masks to add; each of its layers predicts (and is supervised on) its "
                                           "own masks"),
        }
        for key, (value, default, why) in unused.items():
            if value != default:
                raise ValueError(
                    f"{key} = {value!r} does nothing with MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "
                    f"ATMShrunkDecoder: {why}. Remove {key} from the config."
                )
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "embed_dim": atm.EMBED_DIM,
            "num_heads": atm.NUM_HEADS,
            "ffn_ratio": atm.FFN_RATIO,
            "dropout": atm.DROPOUT,
            "num_features": len(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES),
            "qu_layers_per_stage": shrunk.QU_LAYERS_PER_STAGE,
            "atm_layers": shrunk.ATM_LAYERS,
            "grid_hw": tuple(s // shrunk.QU_QUERY_STRIDE for s in crop.SIZE),
            "use_input_proj": atm.USE_INPUT_PROJ,
            "input_size": tuple(crop.SIZE),
            # QU's first input is a ViT block before QD: its stride is the patch size.
            "input_stride": cfg.MODEL.VIT.PATCH_SIZE,
        }

    def check_input_size(self, first_feature: Tensor) -> None:
        """Raise if the input (seen through its first feature, B x C x h x w) is not the size the grid was built
        for: the grid's masks would be stretched over another image size, a silently wrong segmentation."""
        if self.input_size is None or self.input_stride is None:
            return
        expected = tuple(math.ceil(s / self.input_stride) for s in self.input_size)
        got = tuple(int(s) for s in first_feature.shape[-2:])
        if got != expected:
            height, width = self.input_size
            got_size = tuple(s * self.input_stride for s in got)
            windows = (
                f"test on windows of the training crop (TEST.SLIDING_WINDOW True, TEST.SLIDE_CROP {height}) or "
                if height == width
                else ""
            )
            raise ValueError(
                f"ATMShrunkDecoder's QU query grid {self.grid_hw[0]}x{self.grid_hw[1]} was built for {height}x{width} "
                f"inputs (INPUT.CROP.SIZE), but got a {got_size[0]}x{got_size[1]} (padded) input (first feature "
                f"{got[0]}x{got[1]}, expected {expected[0]}x{expected[1]}); its masks would be stretched over the "
                f"wrong image. Either {windows}give inputs of INPUT.CROP.SIZE (INPUT.MIN_SIZE_TEST / "
                "INPUT.MAX_SIZE_TEST)."
            )

    def forward(
        self,
        features: Sequence[Tensor],
        mask_features: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        targets: Optional[List[Dict]] = None,
    ) -> Dict:
        """features: the maps QU decodes, in order (B x C x h_i x w_i). Other arguments are unused."""
        self.check_input_size(features[0])
        fused = self.upsampler(features)  # B x D x gh x gw
        memory = fused.flatten(2).permute(2, 0, 1)
        tokens = repeat_tokens(self.class_tokens, fused.shape[0])
        predictions = [self.prediction(t, m, m) for t, m in self.stage(tokens, memory, self.grid_hw)]
        out = dict(predictions[-1])
        out["aux_outputs"] = predictions[:-1]
        return out
