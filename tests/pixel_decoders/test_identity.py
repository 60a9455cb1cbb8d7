"""Tests of the identity pixel decoder (qsegformers/pixel_decoders/identity.py): features are passed on
unchanged in the IN_FEATURES order, nothing is learned, and width mismatches are clear errors."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec

from qsegformers.config import add_qsegformers_config
from qsegformers.pixel_decoders.build import build_pixel_decoder

SHAPES = {name: ShapeSpec(channels=16, stride=16) for name in ("blk6", "blk8", "blk12")}


def build(in_features, conv_dim=16):
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "IdentityPixelDecoder"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = in_features
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = conv_dim
    return build_pixel_decoder(cfg, SHAPES)


def test_passes_the_listed_features_unchanged_in_order():
    decoder = build(["blk12", "blk8", "blk6"])
    feats = {name: torch.randn(2, 16, 4, 4) for name in SHAPES}
    mask_features, encoder_features, multi_scale = decoder.forward_features(feats)
    assert mask_features is None and encoder_features is None
    assert len(multi_scale) == 3
    for got, name in zip(multi_scale, ["blk12", "blk8", "blk6"]):
        assert got is feats[name]
    assert sum(p.numel() for p in decoder.parameters()) == 0


def test_subset_of_features():
    decoder = build(["blk8"])
    feats = {name: torch.randn(1, 16, 2, 2) for name in SHAPES}
    assert decoder.forward_features(feats)[2] == [feats["blk8"]]


def test_width_mismatch_names_convs_dim():
    with pytest.raises(ValueError, match="CONVS_DIM"):
        build(["blk12"], conv_dim=32)


def test_unknown_feature_is_an_error():
    with pytest.raises(ValueError, match="res5"):
        build(["res5"])
