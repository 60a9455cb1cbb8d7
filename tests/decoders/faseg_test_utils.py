"""Tiny FASeg decoders and inputs shared by test_faseg.py, test_dfpq.py and test_hrca.py."""
import torch

from qsegformers.decoders.faseg import FASegState, FASegTransformerDecoder
from qsegformers.decoders.mask2former import DecoderState

B, C, Q, K, D = 2, 32, 6, 4, 16
# 1/32, 1/16, 1/8, 1/4 of a 256 x 256 image: HW_32 = 64, so omega_rate 32 selects 2 cells of 8 x 8.
SIZES = [(8, 8), (16, 16), (32, 32), (64, 64)]
MASK_SIZE = SIZES[-1]

FASEG_DEFAULTS = dict(
    num_classes=K, hidden_dim=C, num_queries=Q, nheads=4, dim_feedforward=64, dec_layers=14, pre_norm=False,
    mask_dim=D, enforce_input_project=False,
    dfpq_enabled=True, query_type="dfpq", mlp_layers=2, share_mlp=True, use_bias=True,
    first_layer_pool="foreground", first_layer_pool_threshold=0.5, detach_attn=False, attn_mask_threshold=0.15,
    hrca_enabled=True, omega_rate=32, select_from_level=0, shared_across_queries=True, mapping="block",
    selection="topk", hrca_query_pos="static", extra_final_low_res_layer=True,
)


def make_faseg(seed=0, **overrides):
    torch.manual_seed(seed)
    return FASegTransformerDecoder(C, **{**FASEG_DEFAULTS, **overrides}).eval()


def faseg_state(decoder, feats, pos, mask_features):
    """The ``DecoderState`` a forward of ``decoder`` starts with, its memory prepared as ``decode`` does."""
    state = DecoderState(mask_features=mask_features, method=FASegState(pos_embeddings=pos))
    state.memory = decoder.prepare_memory(feats, state)
    return state


def faseg_inputs(sizes=SIZES, seed=1):
    """features, conditional-PE maps (one per level) and mask features."""
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(B, C, h, w, generator=g) for h, w in sizes]
    pos = [torch.randn(B, C, h, w, generator=g) for h, w in sizes]
    return feats, pos, torch.randn(B, D, *sizes[-1], generator=g)
