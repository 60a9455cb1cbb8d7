"""Declared keys either take effect or are rejected with a message saying why: MASK_FORMER.ENFORCE_INPUT_PROJ in
PFT, ATM.USE_INPUT_PROJ / LAYERS_PER_STAGE / CUMULATIVE_MASKS with ATMShrunkDecoder,
HRCA.EXTRA_FINAL_LOW_RES_LAYER without HRCA, MP.NOISE_PER_LAYER with shift/scale noise."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import Conv2d

from qsegformers.config import add_qsegformers_config
from qsegformers.decoders.atm_layers import TokenProjection
from qsegformers.decoders.build import build_transformer_decoder

C, K = 16, 5


def small_cfg(decoder_name, **keys):
    """A config with a tiny decoder; ``keys``: dotted key (with "." as "__") -> value."""
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    mf = cfg.MODEL.MASK_FORMER
    mf.TRANSFORMER_DECODER_NAME = decoder_name
    mf.update(HIDDEN_DIM=C, NHEADS=4, DIM_FEEDFORWARD=32, DEC_LAYERS=3, NUM_OBJECT_QUERIES=4)
    cfg.MODEL.SEM_SEG_HEAD.update(NUM_CLASSES=K, MASK_DIM=8)
    for dotted, value in keys.items():
        *path, leaf = dotted.split("__")
        node = cfg
        for part in path:
            node = node[part]
        node[leaf] = value
    return cfg


# ---- PFT: MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ takes effect ----

@pytest.mark.parametrize("enforce", [True, False])
def test_pft_enforce_input_proj_projects_features_of_the_decoder_width(enforce):
    torch.manual_seed(0)
    decoder = build_transformer_decoder(
        small_cfg("PyramidFusionTransformerDecoder", MODEL__MASK_FORMER__ENFORCE_INPUT_PROJ=enforce), C
    )
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, C, h, w, generator=g) for h, w in [(2, 3), (4, 6), (8, 12)]]
    src, _, _ = decoder.prepare_memory(feats)
    for proj, x, tokens in zip(decoder.input_proj, feats[::-1], src):  # scales finest first
        if enforce:
            assert isinstance(proj, Conv2d) and proj.weight.shape == (C, C, 1, 1)
            expected = F.conv2d(x, proj.weight, proj.bias)
        else:
            assert not list(proj.parameters())
            expected = x
        torch.testing.assert_close(tokens, expected.flatten(2).permute(2, 0, 1))
    assert sum(isinstance(p, Conv2d) for p in decoder.input_proj) == (3 if enforce else 0)


# ---- ATMShrunkDecoder: USE_INPUT_PROJ takes effect, the cascade-only keys are rejected ----

def shrunk_cfg(**keys):
    cfg = small_cfg("ATMShrunkDecoder", **keys)
    cfg.MODEL.ATM.update(EMBED_DIM=C, NUM_HEADS=4, FFN_RATIO=2, DROPOUT=0.0)
    cfg.MODEL.SHRUNK.update(QU_QUERY_STRIDE=16, QU_LAYERS_PER_STAGE=1, ATM_LAYERS=2)
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["blk2", "blk4"]
    cfg.INPUT.CROP.update(TYPE="absolute", SIZE=[64, 48])
    return cfg


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def test_shrunk_use_input_proj_false_feeds_the_raw_tokens_to_qu():
    torch.manual_seed(0)
    with_proj = build_transformer_decoder(shrunk_cfg(), C).eval()
    torch.manual_seed(0)
    without = build_transformer_decoder(shrunk_cfg(MODEL__ATM__USE_INPUT_PROJ=False), C).eval()
    assert all(isinstance(p, TokenProjection) for p in with_proj.upsampler.input_proj)
    # two QU stages lose their Linear(C, C) + LayerNorm(C)
    assert count_parameters(with_proj) - count_parameters(without) == 2 * (C * C + C + 2 * C)
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(2, C, 4, 3, generator=g), torch.randn(2, C, 2, 2, generator=g)]
    with torch.no_grad():
        got = without.upsampler(feats)
        tokens = without.upsampler.queries.weight[:, None].repeat(1, 2, 1)
        for layers, x in zip(without.upsampler.stages, feats):
            for layer in layers:
                tokens = layer(tokens, x.flatten(2).permute(2, 0, 1))
    torch.testing.assert_close(got, tokens.permute(1, 2, 0).reshape(2, C, 4, 3))
    with pytest.raises(ValueError, match="MODEL.ATM.USE_INPUT_PROJ is False"):
        build_transformer_decoder(shrunk_cfg(MODEL__ATM__USE_INPUT_PROJ=False), 2 * C)


@pytest.mark.parametrize(
    "key, value, why",
    [("LAYERS_PER_STAGE", 2, "MODEL.SHRUNK.ATM_LAYERS"), ("CUMULATIVE_MASKS", False, "one ATM stage")],
)
def test_shrunk_rejects_cascade_only_keys(key, value, why):
    with pytest.raises(ValueError) as err:
        build_transformer_decoder(shrunk_cfg(**{f"MODEL__ATM__{key}": value}), C)
    message = str(err.value)
    assert f"MODEL.ATM.{key} = {value!r} does nothing" in message and "ATMShrunkDecoder" in message
    assert why in message
    # the cascade itself reads them
    cascade = small_cfg("ATMDecoder", **{f"MODEL__ATM__{key}": value})
    cascade.MODEL.ATM.update(EMBED_DIM=C, NUM_HEADS=4)
    decoder = build_transformer_decoder(cascade, C)
    assert (len(decoder.stages[0].layers) if key == "LAYERS_PER_STAGE" else decoder.cumulative_masks) == value


# ---- FASeg: HRCA.EXTRA_FINAL_LOW_RES_LAYER ----

def faseg_cfg(**keys):
    return small_cfg("FASegTransformerDecoder", **{"MODEL__MASK_FORMER__DEC_LAYERS": 14, **keys})


def test_extra_final_layer_switch_without_hrca_is_rejected():
    with pytest.raises(ValueError, match="EXTRA_FINAL_LOW_RES_LAYER = False does nothing with MODEL.HRCA.ENABLED"):
        build_transformer_decoder(
            faseg_cfg(MODEL__HRCA__ENABLED=False, MODEL__HRCA__EXTRA_FINAL_LOW_RES_LAYER=False), C
        )
    assert build_transformer_decoder(faseg_cfg(MODEL__HRCA__ENABLED=False), C).num_layers == 13


def test_extra_final_layer_decides_which_layer_counts_are_valid():
    """With HRCA: True needs 4 r + 1 layers ending on 1/32, False 4 r layers ending on HRCA; the error says how."""
    assert build_transformer_decoder(faseg_cfg(), C).num_layers == 13
    with pytest.raises(ValueError, match=r"set DEC_LAYERS = 4 \* rounds \+ 1 .*13 with False"):
        build_transformer_decoder(faseg_cfg(MODEL__HRCA__EXTRA_FINAL_LOW_RES_LAYER=False), C)
    decoder = build_transformer_decoder(
        faseg_cfg(MODEL__MASK_FORMER__DEC_LAYERS=13, MODEL__HRCA__EXTRA_FINAL_LOW_RES_LAYER=False), C
    )
    assert decoder.num_layers == 12 and (decoder.num_layers - 1) % decoder.num_feature_levels == 3  # ends on HRCA


# ---- MP-Former: MP.NOISE_PER_LAYER only for point noise ----

@pytest.mark.parametrize("noise", ["shift", "scale", "shift_scale", "none"])
def test_noise_per_layer_false_is_rejected_without_point_noise(noise):
    cfg = small_cfg("MPMaskedTransformerDecoder", MODEL__MP__MASK_NOISE=noise, MODEL__MP__NOISE_PER_LAYER=False)
    with pytest.raises(ValueError) as err:
        build_transformer_decoder(cfg, C)
    message = str(err.value)
    assert f"MODEL.MP.NOISE_PER_LAYER = False has no effect with MODEL.MP.MASK_NOISE = {noise!r}" in message
    assert "drawn once per step" in message
    cfg.MODEL.MP.NOISE_PER_LAYER = True
    assert build_transformer_decoder(cfg, C).mask_noise == noise


def test_noise_per_layer_false_with_point_noise_builds():
    cfg = small_cfg("MPMaskedTransformerDecoder", MODEL__MP__NOISE_PER_LAYER=False)
    decoder = build_transformer_decoder(cfg, C)
    assert (decoder.mask_noise, decoder.noise_per_layer) == ("point", False)
