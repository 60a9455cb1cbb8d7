"""Config keys of the Pyramid Fusion Transformer (``MODEL.PFT.*``).

The decoder width, heads, FFN size, norm placement, number of predictions and deep supervision are the
shared Mask2Former keys (``MODEL.MASK_FORMER.{HIDDEN_DIM,NHEADS,DIM_FEEDFORWARD,PRE_NORM,DEC_LAYERS,
DEEP_SUPERVISION}``; DEC_LAYERS counts the prediction on the input queries, so PFT's 6 layers are
DEC_LAYERS = 7). Everything PFT-specific, including every choice the paper leaves open, is here.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_pft_config"]


def add_pft_config(cfg):
    """Declare ``MODEL.PFT.*`` with the paper's defaults (spec: shared/specs/pft.md). Idempotent."""
    if hasattr(cfg.MODEL, "PFT"):
        return
    cfg.MODEL.PFT = CN()
    pft = cfg.MODEL.PFT
    # ---- decoder ----
    pft.DROPOUT = 0.1  # dropout of the SA / IQA / CA / FFN sub-layers (MaskFormer's 0.1)
    pft.NUM_SCALES = 3  # pyramid levels decoded in parallel, coarsest first (3: strides 32, 16, 8)
    pft.CROSS_SCALE_ATTENTION = True  # inter-query attention (IQA) across the scales' queries
    pft.IQA_FFN = False  # add an FFN after IQA (paper text; its parameter count says no)
    pft.FFN_POSITION = "after_cross"  # per-scale FFN: "after_cross" (SA-IQA-CA-FFN) or "after_self"
    pft.CLS_HEAD = "shared_linear"  # class logit per query: "shared_linear" Linear(C, 1) or "per_class"
    pft.OUTPUT_NORM = True  # LayerNorm on the queries before the heads
    pft.SUPERVISE_INPUT_QUERIES = True  # also predict (and supervise) from the input queries
    # ---- losses (fixed matching: query k <-> class k) ----
    pft.CE_WEIGHT = 1.0  # BCE on the scale-averaged class logits (0.5 for PASCAL-Context)
    pft.FOCAL_CE_WEIGHT = 1.0  # sigmoid focal loss on each scale's class logits (2.0 for Swin-T/S)
    pft.FOCAL_ALPHA = 0.25  # focal alpha (class and mask focal losses)
    pft.FOCAL_GAMMA = 2.0  # focal gamma (class and mask focal losses)
    pft.MASK_FOCAL_WEIGHT = 20.0  # sigmoid focal loss on the averaged masks of present classes
    pft.DICE_WEIGHT = 1.0  # dice loss on the averaged masks of present classes
    pft.MASK_LOSS_SAMPLING = "dense"  # "dense" (MaskFormer) or "points" (MASK_FORMER.TRAIN_NUM_POINTS)
    pft.ATTN_LOSS_WEIGHT = 0.1  # lambda_attn of the cross-attention weight loss
    pft.ATTN_LOSS_ABSENT_WEIGHT = 0.1  # omega of an absent class (uniform target)
    pft.ATTN_LOSS_ABSENT_UNIFORM = True  # False: absent classes get no attention loss (ablation)
    pft.ATTN_LOSS_END_FRACTION = 0.75  # attention loss only while iter < this * SOLVER.MAX_ITER
    pft.ATTN_LOSS_LAYERS = "all"  # "all" decoder layers or only the "last"
    pft.ATTN_TARGET_RESAMPLE = "area"  # GT mask -> stride-s grid: "area" (average) or "nearest"
