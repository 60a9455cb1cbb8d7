"""Tests of qsegformers/pixel_decoders/msdeform.py (MSDeformAttnPixelDecoder) and position_encoding.py."""
import math
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg

from qsegformers.config import add_qsegformers_config
from qsegformers.pixel_decoders.build import build_pixel_decoder
from qsegformers.pixel_decoders.msdeform import MSDeformAttnEncoder, MSDeformAttnPixelDecoder
from qsegformers.pixel_decoders.position_encoding import PositionEmbeddingSine

from pixel_decoder_inputs import R50_SHAPES, TINY_SHAPES, random_features

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "reference"  # copied official facts
REFERENCE_TSV = REFERENCE_DIR / "mask2former_ade20k_sem_r50_state_dict.tsv"
REFERENCE_CONFIG = REFERENCE_DIR / "mask2former_ade20k_sem_r50_config.yaml"
PREFIX = "sem_seg_head.pixel_decoder."


def _cfg(**head):
    """Reference (official ADE20K R50) pixel-decoder settings, overridden by ``head``."""
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    ssh = cfg.MODEL.SEM_SEG_HEAD
    ssh.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    ssh.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    ssh.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    ssh.CONVS_DIM = 256
    ssh.MASK_DIM = 256
    ssh.NORM = "GN"
    ssh.TRANSFORMER_ENC_LAYERS = 6
    ssh.COMMON_STRIDE = 4
    for key, val in head.items():
        ssh[key] = val
    return cfg


def _tiny_cfg(**head):
    return _cfg(**{"CONVS_DIM": 32, "MASK_DIM": 16, "TRANSFORMER_ENC_LAYERS": 2, **head})


def _reference_entries():
    entries = []
    for line in REFERENCE_TSV.read_text().splitlines()[1:]:
        key, shape, _ = line.split("\t")
        if key.startswith(PREFIX):
            entries.append((key[len(PREFIX):], tuple(int(x) for x in shape.strip("[]").split(","))))
    return entries


def _official_cfg():
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.merge_from_file(str(REFERENCE_CONFIG))
    return cfg


@pytest.mark.parametrize("cfg_source", ["keys", "official_yaml"])
def test_state_dict_matches_official_reference(cfg_source):
    cfg = _cfg() if cfg_source == "keys" else _official_cfg()
    model = build_pixel_decoder(cfg, R50_SHAPES)
    assert isinstance(model, MSDeformAttnPixelDecoder)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    reference = _reference_entries()
    assert len(reference) == 117
    assert ours == reference


def test_forward_shapes_and_strides():
    torch.manual_seed(0)
    model = build_pixel_decoder(_tiny_cfg(), TINY_SHAPES)
    model.eval()
    mask_features, encoder_features, multi_scale = model.forward_features(random_features(TINY_SHAPES))
    assert mask_features.shape == (2, 16, 16, 16)
    assert encoder_features.shape == (2, 32, 2, 2)
    assert [tuple(f.shape) for f in multi_scale] == [(2, 32, 2, 2), (2, 32, 4, 4), (2, 32, 8, 8)]
    assert multi_scale[0] is encoder_features
    assert all(torch.isfinite(f).all() for f in [mask_features, *multi_scale])


def test_non_square_input_and_impl_choice_agree():
    torch.manual_seed(0)
    feats = {k: torch.randn(1, s.channels, 64 // s.stride, 96 // s.stride) for k, s in TINY_SHAPES.items()}
    torch.manual_seed(1)
    auto = build_pixel_decoder(_tiny_cfg(DEFORMABLE_ATTN_IMPL="auto"), TINY_SHAPES).eval()
    torch.manual_seed(1)
    pytorch = build_pixel_decoder(_tiny_cfg(DEFORMABLE_ATTN_IMPL="pytorch"), TINY_SHAPES).eval()
    out_auto = auto.forward_features(feats)
    out_pytorch = pytorch.forward_features(feats)
    assert out_auto[0].shape == (1, 16, 16, 24)
    assert [tuple(f.shape[-2:]) for f in out_auto[2]] == [(2, 3), (4, 6), (8, 12)]
    torch.testing.assert_close(out_auto[0], out_pytorch[0])


def test_backward_gives_finite_gradients_on_every_parameter():
    torch.manual_seed(0)
    model = build_pixel_decoder(_tiny_cfg(), TINY_SHAPES)
    # At init the queries (and so the position and level embeddings) do not move the sampling
    # (zero offset and attention weights); perturb them so that every path carries gradient.
    with torch.no_grad():
        for layer in model.transformer.encoder.layers:
            layer.self_attn.sampling_offsets.weight.normal_(std=0.1)
            layer.self_attn.attention_weights.weight.normal_(std=0.1)
    mask_features, _, multi_scale = model.forward_features(random_features(TINY_SHAPES, size=64))
    loss = mask_features.square().mean() + sum(f.square().mean() for f in multi_scale)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"MODEL\.SEM_SEG_HEAD\.DEFORMABLE_ATTN_IMPL"):
        build_pixel_decoder(_tiny_cfg(DEFORMABLE_ATTN_IMPL="triton"), TINY_SHAPES)
    with pytest.raises(ValueError, match=r"DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES"):
        build_pixel_decoder(_tiny_cfg(IN_FEATURES=["res2", "res3", "res4"]), TINY_SHAPES)
    cfg = _tiny_cfg()
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoderTypo"
    with pytest.raises(KeyError, match=r"MODEL\.SEM_SEG_HEAD\.PIXEL_DECODER_NAME.*MSDeformAttnPixelDecoder\b"):
        build_pixel_decoder(cfg, TINY_SHAPES)


def test_config_values_reach_the_encoder():
    """As in the official from_config: heads = MODEL.MASK_FORMER.NHEADS (not the SEM_SEG_HEAD key, which the
    original declares at 8 and never reads), 4 points, FFN 1024, dropout = MODEL.MASK_FORMER.DROPOUT."""
    cfg = _tiny_cfg()
    cfg.MODEL.MASK_FORMER.NHEADS = 4
    assert cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS == 8
    model = build_pixel_decoder(cfg, TINY_SHAPES)
    layers = model.transformer.encoder.layers
    assert len(layers) == 2
    attn = layers[0].self_attn
    assert (attn.n_heads, attn.n_points, attn.n_levels) == (4, 4, 3)
    assert layers[0].linear1.out_features == 1024
    assert layers[0].dropout1.p == pytest.approx(0.1)
    assert model.transformer_in_features == ["res5", "res4", "res3"]
    assert model.num_fpn_levels == 1


@pytest.mark.parametrize("key, value", [("DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS", 4),
                                        ("DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS", 2)])
def test_unread_official_encoder_keys_reject_other_values(key, value):
    """The original ignores these keys, so a changed value would silently build another model than asked for."""
    with pytest.raises(ValueError, match=rf"MODEL\.SEM_SEG_HEAD\.{key} = {value}.*MODEL\.MASK_FORMER\.NHEADS"):
        build_pixel_decoder(_tiny_cfg(**{key: value}), TINY_SHAPES)


def test_encoder_reference_points_are_pixel_centres():
    points = MSDeformAttnEncoder.reference_points([(2, 4), (1, 2)], batch_size=3, num_levels=2, device="cpu")
    assert points.shape == (3, 8 + 2, 2, 2)
    torch.testing.assert_close(points[0, 0, 0], torch.tensor([0.125, 0.25]))
    torch.testing.assert_close(points[2, 7, 1], torch.tensor([0.875, 0.75]))
    torch.testing.assert_close(points[0, 9, 0], torch.tensor([0.75, 0.5]))


def test_position_embedding_sine():
    pe = PositionEmbeddingSine(num_pos_feats=4, normalize=True)
    pos = pe(torch.zeros(2, 7, 3, 5))
    assert pos.shape == (2, 8, 3, 5)
    # Channel 0: sin of the normalised y position (row 0 -> 1/3 of 2*pi); channel 4 on: x.
    torch.testing.assert_close(pos[0, 0, 0, 0], torch.tensor(math.sin(2 * math.pi / 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(pos[0, 1, 2, 0], torch.tensor(math.cos(2 * math.pi)), atol=1e-5, rtol=0)
    torch.testing.assert_close(pos[1, 4, 1, 4], torch.tensor(math.sin(2 * math.pi)), atol=1e-5, rtol=0)
    # Frequencies: channels 2, 3 use temperature ** (2 / 4).
    torch.testing.assert_close(pos[0, 2, 0, 0], torch.tensor(math.sin(2 * math.pi / 3 / 100.0)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="normalize"):
        PositionEmbeddingSine(scale=1.0)
