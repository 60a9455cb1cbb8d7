"""Config keys of FASeg: dynamic focus-aware positional queries (``MODEL.DFPQ.*``) and high-resolution
cross-attention (``MODEL.HRCA.*``).

The decoder width, heads, FFN size, norm placement and number of predictions are the shared Mask2Former keys
(``MODEL.MASK_FORMER.*``); FASeg's 13 layers are ``DEC_LAYERS = 14``. Spec: shared/specs/dfpq.md.
Setting ``DFPQ.ENABLED=False, HRCA.ENABLED=False, DFPQ.POS_ENCODING="sine", DFPQ.ATTN_MASK_THRESHOLD=0.5``
and ``DEC_LAYERS=10`` gives back Mask2Former exactly.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_faseg_config"]


def add_faseg_config(cfg):
    """Declare ``MODEL.DFPQ.*`` and ``MODEL.HRCA.*`` with the spec's defaults. Idempotent."""
    if hasattr(cfg.MODEL, "DFPQ"):
        return
    cfg.MODEL.DFPQ = CN()
    dfpq = cfg.MODEL.DFPQ
    dfpq.ENABLED = True  # False: the positional query is the learnable embedding B at every layer
    # learnable | grid_anchor | dynamic_anchor | dynamic_foreground | dfpq (Table 5)
    dfpq.QUERY_TYPE = "dfpq"
    dfpq.POS_ENCODING = "conditional"  # key positional encodings K_p: sine | learnable | conditional (PEG)
    dfpq.PEG_KERNEL_SIZE = 3  # kernel of the depth-wise conditional-PE conv (one per scale)
    dfpq.LEARNABLE_PE_SIZE = 32  # side of the learnable absolute PE grid per scale (resized to the map)
    dfpq.MLP_LAYERS = 2  # depth of the MLP h (Linear-ReLU-Linear)
    dfpq.SHARE_MLP = True  # one h for all layers (official); False: one h per decoder layer
    dfpq.USE_BIAS = True  # add the learnable positional query B before h
    # foreground (paper) | background (official code) | none (h(B)) | "": the decoder name's own default,
    # foreground for FASegTransformerDecoder, background for the official MultiScaleMaskedTransformerDecoderFASeg
    dfpq.FIRST_LAYER_POOL = ""
    dfpq.FIRST_LAYER_POOL_THRESHOLD = 0.5  # mask probability splitting foreground from background
    dfpq.DETACH_ATTN = False  # stop the gradient through the attention map A (official: keep it)
    dfpq.ATTN_MASK_THRESHOLD = 0.15  # masked attention attends where mask prob >= this (Mask2Former: 0.5)

    cfg.MODEL.HRCA = CN()
    hrca = cfg.MODEL.HRCA
    hrca.ENABLED = True  # add an HRCA layer on the 1/4 features to every round of the decoder
    hrca.OMEGA_RATE = 32  # k_low = floor(HW_low / OMEGA_RATE) selected low-resolution cells (>= 1)
    hrca.SELECT_FROM_LEVEL = 0  # low-res level (0: 1/32, 1: 1/16, 2: 1/8) of the same round that selects
    hrca.SHARED_ACROSS_QUERIES = True  # one token set per image (sum over queries); False: one per query
    hrca.MAPPING = "block"  # block (official: each cell -> its r x r block) | bilinear (Eq. 3 literal)
    hrca.SELECTION = "topk"  # topk | random (same count, uniform) | all (vanilla dense attention)
    hrca.LEVELS = ["1/4"]  # levels with HRCA; only ["1/4"] is implemented (Table 8 variants are not)
    hrca.QUERY_POS = "static"  # positional query of the HRCA cross-attention: static (B) | dfpq
    hrca.EXTRA_FINAL_LOW_RES_LAYER = True  # HRCA: DEC_LAYERS - 1 = rounds * 4 + 1 (True) or rounds * 4 (False)
