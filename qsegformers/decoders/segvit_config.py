"""Config keys of SegViT (``MODEL.ATM.*``, ``MODEL.SHRUNK.*``). Its sliding-window testing uses the shared
``TEST.SLIDING_WINDOW``, ``TEST.SLIDE_CROP`` and ``TEST.SLIDE_STRIDE`` (declared in ``qsegformers/config.py``).

Spec: shared/specs/segvit.md. The backbone is ``D2PlainViT`` (``MODEL.VIT.*``) or, for the Shrunk structure,
``D2ShrunkViT``; the pixel decoder is ``IdentityPixelDecoder``, which hands the ViT block outputs listed in
``MODEL.SEM_SEG_HEAD.IN_FEATURES`` to the decoder in that order (SegViT lists them deepest first), so
``MODEL.SEM_SEG_HEAD.CONVS_DIM`` must equal the ViT width. The decoder is ``ATMDecoder`` (cascade) or
``ATMShrunkDecoder`` (QU + one ATM stage); the criterion is ``ATMCriterion`` with the ``FixedMatcher``.

SegViT's optimizer (AdamW 2e-5, head LR x10, wd 0.01, poly 1.0, linear warm-up 1500 from 1e-6, full-model
clipping at 35) uses the shared solver keys: ``SOLVER.BASE_LR = 2e-4`` with ``SOLVER.BACKBONE_MULTIPLIER =
0.1`` gives the same per-group learning rates, ``SOLVER.WEIGHT_DECAY_NORM = 0`` the "norm"/"ln" rule.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_segvit_config", "DEFAULT_LAYERS_PER_STAGE", "DEFAULT_CUMULATIVE_MASKS"]

# Defaults of the cascade-only keys, which ATMShrunkDecoder accepts only unchanged.
DEFAULT_LAYERS_PER_STAGE = 3
DEFAULT_CUMULATIVE_MASKS = True


def add_segvit_config(cfg):
    """Declare ``MODEL.ATM.*`` and ``MODEL.SHRUNK.*``. Idempotent."""
    if hasattr(cfg.MODEL, "ATM"):
        return
    cfg.MODEL.ATM = CN()
    atm = cfg.MODEL.ATM
    # ---- decoder (one learnable token per class; queries = MODEL.SEM_SEG_HEAD.NUM_CLASSES) ----
    atm.EMBED_DIM = 384  # decoder width D (ViT width / 2; ViT-L: 512)
    atm.NUM_HEADS = 12  # attention heads of the ATM layers (ViT-L: 16)
    atm.LAYERS_PER_STAGE = DEFAULT_LAYERS_PER_STAGE  # layers per ATM stage (cascade; Shrunk: SHRUNK.ATM_LAYERS)
    atm.FFN_RATIO = 4  # FFN hidden width / EMBED_DIM
    atm.DROPOUT = 0.1  # dropout of the attention weights and of every residual branch
    atm.USE_INPUT_PROJ = True  # Linear + LayerNorm of each stage's (Shrunk: QU stage's) backbone tokens
    atm.CUMULATIVE_MASKS = DEFAULT_CUMULATIVE_MASKS  # stage s predicts the sum of stages 1..s (cascade only)
    # ---- losses (fixed matching: query k <-> class k) ----
    atm.LOSS_TYPE = "mask"  # "mask": cls CE + focal + dice; "ce": per-pixel CE on the semantic scores (ablation)
    atm.CLASS_WEIGHT = 1.0  # weight of the (K+1)-way class cross-entropy
    atm.FOCAL_WEIGHT = 20.0  # weight of the sigmoid focal mask loss
    atm.DICE_WEIGHT = 1.0  # weight of the dice mask loss
    atm.CE_WEIGHT = 1.0  # weight of the per-pixel CE of LOSS_TYPE "ce"
    atm.NO_OBJECT_WEIGHT = 0.1  # CE weight of the no-object class
    atm.FOCAL_ALPHA = 0.25  # focal alpha of the mask loss
    atm.FOCAL_GAMMA = 2.0  # focal gamma of the mask loss

    cfg.MODEL.SHRUNK = CN()
    shrunk = cfg.MODEL.SHRUNK
    # ---- backbone: query-based down-sampling (QD), read by D2ShrunkViT ----
    shrunk.QD_BLOCK = 8  # 0-based ViT block whose attention queries are the 2x down-sampled tokens (ViT-B: 4)
    shrunk.QD_METHOD = "nearest_q"  # "nearest_q" (default) | "nearest_qkv" | "conv_q" (Table 7 ablations)
    # ---- decoder: query-based up-sampling (QU), read by ATMShrunkDecoder ----
    shrunk.QU_QUERY_STRIDE = 16  # QU has (crop / stride)^2 learnable queries, crop = INPUT.CROP.SIZE
    shrunk.QU_LAYERS_PER_STAGE = 3  # decoder layers of each QU stage (one stage per input feature)
    shrunk.ATM_LAYERS = 3  # layers of the single ATM stage; each one is supervised

