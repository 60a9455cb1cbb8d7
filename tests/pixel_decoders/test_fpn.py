"""Tests of qsegformers/pixel_decoders/fpn.py (BasePixelDecoder) and build.py."""
import pytest
import torch
from detectron2.config import get_cfg

from qsegformers.config import add_qsegformers_config
from qsegformers.pixel_decoders.build import build_pixel_decoder
from qsegformers.pixel_decoders.fpn import BasePixelDecoder

from pixel_decoder_inputs import R50_SHAPES, TINY_SHAPES, random_features


def _cfg(**head):
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "BasePixelDecoder"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
    for key, val in head.items():
        cfg.MODEL.SEM_SEG_HEAD[key] = val
    return cfg


def test_state_dict_keys_follow_maskformer_names():
    model = build_pixel_decoder(_cfg(CONVS_DIM=256, MASK_DIM=256), R50_SHAPES)
    assert isinstance(model, BasePixelDecoder)
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert shapes == [
        ("adapter_1.weight", (256, 256, 1, 1)),
        ("adapter_1.norm.weight", (256,)),
        ("adapter_1.norm.bias", (256,)),
        ("layer_1.weight", (256, 256, 3, 3)),
        ("layer_1.norm.weight", (256,)),
        ("layer_1.norm.bias", (256,)),
        ("adapter_2.weight", (256, 512, 1, 1)),
        ("adapter_2.norm.weight", (256,)),
        ("adapter_2.norm.bias", (256,)),
        ("layer_2.weight", (256, 256, 3, 3)),
        ("layer_2.norm.weight", (256,)),
        ("layer_2.norm.bias", (256,)),
        ("adapter_3.weight", (256, 1024, 1, 1)),
        ("adapter_3.norm.weight", (256,)),
        ("adapter_3.norm.bias", (256,)),
        ("layer_3.weight", (256, 256, 3, 3)),
        ("layer_3.norm.weight", (256,)),
        ("layer_3.norm.bias", (256,)),
        ("layer_4.weight", (256, 2048, 3, 3)),
        ("layer_4.norm.weight", (256,)),
        ("layer_4.norm.bias", (256,)),
        ("mask_features.weight", (256, 256, 3, 3)),
        ("mask_features.bias", (256,)),
    ]


def test_in_features_filter_and_no_norm_uses_bias():
    model = build_pixel_decoder(_cfg(CONVS_DIM=32, MASK_DIM=16, NORM="", IN_FEATURES=["res3", "res4", "res5"]),
                                TINY_SHAPES)
    keys = list(model.state_dict())
    assert model.in_features == ["res3", "res4", "res5"]
    assert "adapter_1.bias" in keys and "layer_3.bias" in keys
    assert not any(".norm." in k for k in keys)


def test_forward_shapes_and_strides():
    torch.manual_seed(0)
    model = build_pixel_decoder(_cfg(CONVS_DIM=32, MASK_DIM=16), TINY_SHAPES)
    mask_features, encoder_features, multi_scale = model.forward_features(random_features(TINY_SHAPES))
    assert mask_features.shape == (2, 16, 16, 16)
    assert encoder_features is None
    assert [tuple(f.shape) for f in multi_scale] == [(2, 32, 2, 2), (2, 32, 4, 4), (2, 32, 8, 8)]


def test_backward_gives_finite_gradients_on_every_parameter():
    torch.manual_seed(0)
    model = build_pixel_decoder(_cfg(CONVS_DIM=32, MASK_DIM=16), TINY_SHAPES)
    mask_features, _, multi_scale = model.forward_features(random_features(TINY_SHAPES, size=32))
    loss = mask_features.square().mean() + sum(f.mean() for f in multi_scale)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_unknown_pixel_decoder_name():
    cfg = _cfg()
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "NoSuchDecoder"
    with pytest.raises(KeyError, match=r"MODEL\.SEM_SEG_HEAD\.PIXEL_DECODER_NAME.*NoSuchDecoder"):
        build_pixel_decoder(cfg, TINY_SHAPES)


def test_built_module_must_have_forward_features():
    from qsegformers.registries import PIXEL_DECODER_REGISTRY

    class _NoForwardFeatures(torch.nn.Module):
        def __init__(self, cfg, input_shape):
            super().__init__()

    name = "_TestNoForwardFeaturesDecoder"
    PIXEL_DECODER_REGISTRY._do_register(name, _NoForwardFeatures)
    try:
        cfg = _cfg()
        cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = name
        with pytest.raises(ValueError, match="forward_features"):
            build_pixel_decoder(cfg, TINY_SHAPES)
    finally:
        PIXEL_DECODER_REGISTRY._obj_map.pop(name)
