"""Config keys of MP-Former's mask-piloted training (``MODEL.MP.*``), plus the official MP-Former fork's
``MODEL.DN.*`` so that its merged configs load (its ``MODEL.MASK_FORMER.*DN*`` and ``SOLVER.*`` keys are
declared by ``qsegformers/config.py``, which owns those namespaces).

Mask-piloted (MP) training only changes training: the decoder and its inference are Mask2Former's
(shared ``MODEL.MASK_FORMER.*`` keys). Spec: shared/specs/mpformer.md, section 5.

The official keys are declared with ``None`` ("not set") where they map onto one of ours; when a file
sets them, :func:`mp_options` lets them win over the ``MODEL.MP`` key they stand for. Official keys whose
meaning qsegformers does not implement are fixed to the official values by
``qsegformers.config.check_unsupported_keys``.
"""
from typing import Dict

from detectron2.config import CfgNode as CN

__all__ = ["add_mp_config", "mp_options", "MASK_NOISES", "POINT_NOISE_MODES", "GT_DOWNSAMPLES"]

MASK_NOISES = ("none", "point", "shift", "scale", "shift_scale")
POINT_NOISE_MODES = ("uniform_count", "bernoulli")
GT_DOWNSAMPLES = ("area_any", "nearest", "bilinear_0.5")
ASSIGNMENTS = ("hard", "hungarian")
QUERY_POSITIONS = ("zeros", "learned")

# Official NUM_DN values from this one on are an MP-slot budget (G = NUM_DN // T_max); below it, G itself.
OFFICIAL_BUDGET_FROM = 100
# ALL_LY_DN = False in the official code pilots the masks of layers 0..3 ("first three layers" + 1).
OFFICIAL_FIRST_LAYERS = 4


def add_mp_config(cfg):
    """Declare ``MODEL.MP.*`` (paper defaults) and the official fork's ``MODEL.DN.*``. Idempotent."""
    if hasattr(cfg.MODEL, "MP"):
        return
    cfg.MODEL.MP = CN()
    mp = cfg.MODEL.MP
    mp.ENABLED = True  # add the MP part in training (never in evaluation)
    mp.NUM_QUERIES = 100  # MP slot budget: G = max(1, NUM_QUERIES // T_max) groups of the GT set
    mp.NUM_GROUPS = 0  # > 0: fixed number of groups G instead of the budget
    mp.LAYERS = -1  # -1: pilot masks in every layer; n: only layers 0..n-1 (later: own predictions)
    mp.MASK_NOISE = "point"  # pilot-mask noise: none | point | shift | scale | shift_scale
    mp.POINT_NOISE_RATIO = 0.2  # lambda_p: up to lambda_p * area pixels flipped
    mp.POINT_NOISE_MODE = "uniform_count"  # uniform_count (paper) | bernoulli (official code)
    mp.SHIFT_NOISE_SCALE = 0.2  # shift of up to this * half the GT box size
    mp.SCALE_NOISE_SCALE = 0.2  # scale factor drawn from U(1 - s, 1 + s) about the box centre
    # fresh point noise for every layer (False: one draw per level and step; point noise only, see mp_former.py)
    mp.NOISE_PER_LAYER = True
    mp.PER_HEAD_NOISE = False  # independent point noise for every attention head
    mp.GT_DOWNSAMPLE = "area_any"  # GT -> level size: area_any (any overlap) | nearest | bilinear_0.5
    mp.LABEL_GUIDED = True  # MP content queries = class embeddings (False: zeros)
    mp.LABEL_NOISE_RATIO = 0.2  # lambda_l: probability of replacing a class by a uniformly drawn one
    mp.CLS_LOSS = True  # classification loss on the MP part
    mp.ASSIGNMENT = "hard"  # MP slot -> GT: hard (slot g*T_max + j -> GT j) | hungarian (ablation)
    mp.LOSS_WEIGHT_MULT = 1.0  # MP loss weights = this * MASK_FORMER.{CLASS,MASK,DICE}_WEIGHT
    mp.QUERY_POS = "zeros"  # positional query of the MP slots: zeros | learned (one shared embedding)
    mp.DROP_QUERY_POS = False  # True: no query_embed at all (the official fork's decoder)

    # ---- official MP-Former fork keys (None = not set; see mp_options) ----
    cfg.MODEL.DN = CN()
    cfg.MODEL.DN.NUM_DN = None  # official MP budget / group count -> MP.NUM_QUERIES or MP.NUM_GROUPS
    cfg.MODEL.DN.NOISE_SCALE = None  # official noise scale -> MP.{POINT,SHIFT,SCALE}_NOISE_*

def _set(value, default):
    return default if value is None else value


def mp_options(cfg) -> Dict:
    """Resolved MP options (lower-case names of the ``MODEL.MP`` keys) with official keys applied."""
    mp, dn, mf = cfg.MODEL.MP, cfg.MODEL.DN, cfg.MODEL.MASK_FORMER
    opts = {
        "enabled": mp.ENABLED,
        "num_queries": mp.NUM_QUERIES,
        "num_groups": mp.NUM_GROUPS,
        "layers": mp.LAYERS,
        "mask_noise": mp.MASK_NOISE,
        "point_noise_ratio": _set(dn.NOISE_SCALE, mp.POINT_NOISE_RATIO),
        "point_noise_mode": mp.POINT_NOISE_MODE,
        "shift_noise_scale": _set(dn.NOISE_SCALE, mp.SHIFT_NOISE_SCALE),
        "scale_noise_scale": _set(dn.NOISE_SCALE, mp.SCALE_NOISE_SCALE),
        "noise_per_layer": mp.NOISE_PER_LAYER,
        "per_head_noise": _set(mf.HEAD_DN, mp.PER_HEAD_NOISE),
        "gt_downsample": mp.GT_DOWNSAMPLE,
        "label_guided": mp.LABEL_GUIDED,
        "label_noise_ratio": mf.LB_NOISE_RATIO if mf.LB_NOISE_RATIO >= 0 else mp.LABEL_NOISE_RATIO,
        "cls_loss": mp.CLS_LOSS if mf.DN_NO_LB is None else not mf.DN_NO_LB,
        "assignment": mp.ASSIGNMENT,
        "loss_weight_mult": mp.LOSS_WEIGHT_MULT,
        "query_pos": mp.QUERY_POS,
        "drop_query_pos": mp.DROP_QUERY_POS,
    }
    if dn.NUM_DN is not None:
        if dn.NUM_DN <= 0:
            opts["enabled"] = False
        elif dn.NUM_DN >= OFFICIAL_BUDGET_FROM:
            opts["num_queries"], opts["num_groups"] = dn.NUM_DN, 0
        else:
            opts["num_groups"] = dn.NUM_DN
    if mf.ALL_LY_DN is not None:
        opts["layers"] = -1 if mf.ALL_LY_DN else OFFICIAL_FIRST_LAYERS
    for key, value, choices in (
        ("MASK_NOISE", opts["mask_noise"], MASK_NOISES),
        ("POINT_NOISE_MODE", opts["point_noise_mode"], POINT_NOISE_MODES),
        ("GT_DOWNSAMPLE", opts["gt_downsample"], GT_DOWNSAMPLES),
        ("ASSIGNMENT", opts["assignment"], ASSIGNMENTS),
        ("QUERY_POS", opts["query_pos"], QUERY_POSITIONS),
    ):
        if value not in choices:
            raise ValueError(f"MODEL.MP.{key} must be one of {choices}, got {value!r}")
    return opts
