"""Official FASeg configs give the official first-layer DFPQ (pooled over the predicted background), our own
configs the paper's (foreground), and the pooling region really sets layer 0's positional query."""
import os

import torch
import torch.nn.functional as F
from detectron2.config import get_cfg

from qsegformers.config import add_qsegformers_config
from qsegformers.decoders.build import build_transformer_decoder

from faseg_test_utils import SIZES, faseg_inputs, make_faseg

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OURS = os.path.join(REPO, "configs/ade20k/semantic-segmentation/faseg/faseg_R50_bs16_160k.yaml")


def _decoder_from(path, *opts):
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return build_transformer_decoder(cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM)


def test_official_config_pools_the_background(reference_dir):
    decoder = _decoder_from(os.path.join(reference_dir, "faseg_ade20k_sem_r50_config.yaml"))
    assert type(decoder).__name__ == "MultiScaleMaskedTransformerDecoderFASeg"
    assert decoder.first_layer_pool == "background"


def test_our_config_pools_the_foreground_and_an_explicit_value_wins(reference_dir):
    ours = _decoder_from(OURS)
    assert type(ours).__name__ == "FASegTransformerDecoder" and ours.first_layer_pool == "foreground"
    official = os.path.join(reference_dir, "faseg_ade20k_sem_r50_config.yaml")
    assert _decoder_from(official, "MODEL.DFPQ.FIRST_LAYER_POOL", "foreground").first_layer_pool == "foreground"
    assert _decoder_from(OURS, "MODEL.DFPQ.FIRST_LAYER_POOL", "background").first_layer_pool == "background"


def _first_layer_query_pos(decoder, feats, pos, mask_features):
    """The positional query layer 0's self-attention receives (N x B x C)."""
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault("pos", kwargs["query_pos"].detach().clone())

    handle = decoder.transformer_self_attention_layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        decoder(feats, mask_features, pos_embeddings=pos)
    handle.remove()
    return seen["pos"]


def _expected_first_layer_query_pos(decoder, pos_32, mask_features, region):
    """h(mean of K_p(1/32) over the region of the initial prediction + B), written out (spec 2.5.2)."""
    with torch.no_grad():
        q = decoder.decoder_norm(decoder.query_feat.weight)  # N x C, the same for every image
        mask0 = torch.einsum("nc,bchw->bnhw", decoder.mask_embed(q), mask_features)
        prob = F.interpolate(mask0, size=SIZES[0], mode="bilinear", align_corners=False).sigmoid().flatten(2)
        inside = (prob >= 0.5) if region == "foreground" else (prob < 0.5)
        kp = pos_32.flatten(2).transpose(1, 2)  # B x HW_32 x C
        pooled = inside.float() @ kp / (inside.float().sum(-1, keepdim=True) + 1e-6)  # B x N x C
        frac = inside.float().mean(-1)  # B x N share of the 1/32 map in the region
        return decoder.adapt_pos2d(pooled + decoder.query_embed.weight[None]).transpose(0, 1), frac


def test_pooling_region_sets_the_first_positional_query():
    feats, pos, mask_features = faseg_inputs()
    got = {}
    for region in ("foreground", "background"):
        decoder = make_faseg(first_layer_pool=region)
        got[region] = _first_layer_query_pos(decoder, feats, pos, mask_features)
        expected, frac = _expected_first_layer_query_pos(decoder, pos[0], mask_features, region)
        torch.testing.assert_close(got[region], expected, rtol=1e-4, atol=1e-5)
        assert ((frac > 0) & (frac < 1)).float().mean() > 0.5  # the region is neither empty nor everything
    # same weights (same seed), different region: a different P_0 for (nearly) every query
    changed = (got["foreground"] - got["background"]).abs().amax(-1) > 1e-3
    assert changed.float().mean() > 0.5

