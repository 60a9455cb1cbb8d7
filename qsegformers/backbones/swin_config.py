"""Config keys of the Swin and SeMask-Swin backbones (``MODEL.SWIN.*``, ``MODEL.SEMASK.*``)."""
from detectron2.config import CfgNode as CN

__all__ = ["add_swin_config", "resolve_compat_key", "COMPAT_UNSET"]

COMPAT_UNSET = -1  # value of an official compatibility key that is not set
SEMASK_NUM_SEM_BLOCKS_DEFAULT = (1, 1, 1, 1)
SEMASK_SEM_WINDOW_SIZE_DEFAULT = 0
SEMASK_PRIOR_LOSS_WEIGHT_DEFAULT = 0.4


def add_swin_config(cfg):
    """Declare ``MODEL.SWIN.*`` (official Mask2Former names) and ``MODEL.SEMASK.*`` with their defaults."""
    cfg.MODEL.SWIN = CN()
    sw = cfg.MODEL.SWIN
    sw.PRETRAIN_IMG_SIZE = 224  # image size of the ImageNet pre-training
    sw.PATCH_SIZE = 4  # patch embedding stride
    sw.EMBED_DIM = 96  # channels of the first stage
    sw.DEPTHS = [2, 2, 6, 2]  # blocks per stage
    sw.NUM_HEADS = [3, 6, 12, 24]  # attention heads per stage
    sw.WINDOW_SIZE = 7  # attention window size
    sw.MLP_RATIO = 4.0  # FFN expansion
    sw.QKV_BIAS = True  # bias on the qkv projection
    sw.QK_SCALE = None  # override of head_dim ** -0.5
    sw.DROP_RATE = 0.0  # dropout
    sw.ATTN_DROP_RATE = 0.0  # attention dropout
    sw.DROP_PATH_RATE = 0.3  # stochastic depth
    sw.APE = False  # absolute position embedding
    sw.PATCH_NORM = True  # LayerNorm after the patch embedding
    sw.OUT_FEATURES = ["res2", "res3", "res4", "res5"]  # returned stages
    sw.USE_CHECKPOINT = False  # activation checkpointing

    # ---- SeMask-Swin (D2SeMaskSwinTransformer); K = MODEL.SEM_SEG_HEAD.NUM_CLASSES ----
    cfg.MODEL.SEMASK = CN()
    sm = cfg.MODEL.SEMASK
    sm.NUM_SEM_BLOCKS = list(SEMASK_NUM_SEM_BLOCKS_DEFAULT)  # SeMask attention blocks per stage (0: no layer)
    sm.SEM_WINDOW_SIZE = SEMASK_SEM_WINDOW_SIZE_DEFAULT  # semantic attention window (0: MODEL.SWIN.WINDOW_SIZE)
    sm.GLOBAL_STAGES = [4]  # 1-based stages with un-windowed (global) semantic attention
    sm.DROPOUT = 0.1  # dropout after the output projection of a SeMask block
    sm.INIT = "trunc_normal"  # "trunc_normal" (trainable update path) or "d2_official" (W_O = 0, kaiming q/k/v)
    sm.PRIOR_LOSS_WEIGHT = SEMASK_PRIOR_LOSS_WEIGHT_DEFAULT  # alpha of the semantic-prior CE loss

    # Official SeMask-Mask2Former names, declared so its files merge. Unset (-1) they defer to MODEL.SEMASK.*;
    # set, they take effect (see resolve_compat_key), and a conflicting MODEL.SEMASK value is an error. The official
    # prior-loss weight MODEL.MASK_FORMER.CATE_WEIGHT is declared by qsegformers/config.py (its namespace owner).
    sw.NUM_SEM_BLOCKS = COMPAT_UNSET  # official: SeMask blocks in every stage (-> SEMASK.NUM_SEM_BLOCKS)
    sw.SEM_WINDOW_SIZE = COMPAT_UNSET  # official: semantic window size (-> SEMASK.SEM_WINDOW_SIZE)


def resolve_compat_key(cfg, official_key: str, canonical_key: str, default, to_canonical=lambda v: v):
    """Effective value of ``canonical_key`` given the official alias ``official_key``.

    The official key wins when set (!= COMPAT_UNSET); if the canonical key was also changed from ``default``
    to a different value, raise a ValueError naming both keys.
    """
    official = _get(cfg, official_key)
    canonical = _get(cfg, canonical_key)
    canonical = list(canonical) if isinstance(canonical, (list, tuple)) else canonical
    if official == COMPAT_UNSET:
        return canonical
    value = to_canonical(official)
    if canonical != default and canonical != value:
        raise ValueError(
            f"{official_key} = {official!r} (official SeMask name) conflicts with {canonical_key} = {canonical!r}; "
            f"set only one of them."
        )
    return value


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node
