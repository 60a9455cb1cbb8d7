"""D2SwinTransformer: shapes at odd sizes, config keys, stochastic depth, checkpointing, APE, init, gradients."""
import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone

from qsegformers import add_qsegformers_config
from qsegformers.backbones import swin
from qsegformers.backbones.swin import D2SwinTransformer

TINY = dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=4, drop_path_rate=0.0)


def tiny_cfg(**swin_keys):
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "D2SwinTransformer"
    cfg.MODEL.SWIN.EMBED_DIM = 16
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 2, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [1, 2, 2, 4]
    cfg.MODEL.SWIN.WINDOW_SIZE = 4
    for key, value in swin_keys.items():
        cfg.MODEL.SWIN[key] = value
    return cfg


def test_shapes_and_strides_at_odd_size():
    backbone = build_backbone(tiny_cfg())
    assert isinstance(backbone, D2SwinTransformer)
    assert backbone.size_divisibility == 32
    shapes = backbone.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "res2": (16, 4), "res3": (32, 8), "res4": (64, 16), "res5": (128, 32)
    }
    x = torch.randn(2, 3, 257, 321)
    out = backbone(x)
    assert sorted(out) == ["res2", "res3", "res4", "res5"]
    h, w = math.ceil(257 / 4), math.ceil(321 / 4)  # patch embedding pads to a multiple of 4
    for name in ["res2", "res3", "res4", "res5"]:
        assert out[name].shape == (2, shapes[name].channels, h, w)
        h, w = math.ceil(h / 2), math.ceil(w / 2)  # patch merging pads odd grids


def test_every_config_key_is_read():
    cfg = tiny_cfg(
        PATCH_SIZE=2, MLP_RATIO=2.0, QKV_BIAS=False, QK_SCALE=0.5, DROP_RATE=0.25, ATTN_DROP_RATE=0.125,
        DROP_PATH_RATE=0.3, APE=True, PRETRAIN_IMG_SIZE=64, PATCH_NORM=False, OUT_FEATURES=["res3", "res5"],
        USE_CHECKPOINT=True,
    )
    b = build_backbone(cfg)
    block = b.layers[0].blocks[0]
    assert b.patch_embed.proj.stride == (2, 2) and b.patch_embed.norm is None
    assert block.mlp.fc1.out_features == 32 and block.attn.qkv.bias is None and block.attn.scale == 0.5
    assert block.mlp.drop.p == 0.25 and b.pos_drop.p == 0.25 and block.attn.attn_drop.p == 0.125
    assert b.absolute_pos_embed.shape == (1, 16, 32, 32)
    assert b.layers[3].blocks[1].drop_path.drop_prob == pytest.approx(0.3)
    assert all(layer.use_checkpoint for layer in b.layers)
    assert {k: v.stride for k, v in b.output_shape().items()} == {"res3": 4, "res5": 16}
    assert sorted(b(torch.randn(1, 3, 64, 64))) == ["res3", "res5"]


def test_drop_path_grows_linearly_over_blocks():
    b = D2SwinTransformer(**{**TINY, "depths": [1, 1, 2, 1], "drop_path_rate": 0.4})
    rates = [blk.drop_path.drop_prob if hasattr(blk.drop_path, "drop_prob") else 0.0 for l in b.layers for blk in l.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_shifted_blocks_alternate():
    b = D2SwinTransformer(**TINY)
    assert [blk.shift_size for blk in b.layers[0].blocks] == [0, 2]


def test_gradient_reaches_every_parameter():
    b = D2SwinTransformer(**{**TINY, "ape": True, "pretrain_img_size": 64}).train()
    out = b(torch.randn(2, 3, 70, 90))
    sum((v**2).mean() for v in out.values()).backward()
    no_grad = [n for n, p in b.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not no_grad


def test_activation_checkpointing_same_result(monkeypatch):
    torch.manual_seed(0)
    plain = D2SwinTransformer(**TINY).train()
    ckpt = D2SwinTransformer(**{**TINY, "use_checkpoint": True}).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    original = swin.activation_checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(swin.activation_checkpoint, "checkpoint", counting)
    x = torch.randn(1, 3, 64, 64)
    grads = []
    for model in (plain, ckpt):
        out = model(x)
        sum(v.sum() for v in out.values()).backward()
        grads.append(model.layers[1].blocks[0].attn.qkv.weight.grad.clone())
    assert len(calls) == sum(TINY["depths"])  # only the checkpointed model, once per block
    torch.testing.assert_close(grads[0], grads[1])


def test_absolute_position_embedding_changes_output_and_state_dict():
    torch.manual_seed(0)
    without = D2SwinTransformer(**TINY).eval()
    with_ape = D2SwinTransformer(**{**TINY, "ape": True, "pretrain_img_size": 64}).eval()
    assert "absolute_pos_embed" not in without.state_dict()
    missing = with_ape.load_state_dict(without.state_dict(), strict=False).missing_keys
    assert missing == ["absolute_pos_embed"]
    x = torch.randn(1, 3, 96, 64)  # not the pre-training size: the embedding is interpolated
    with torch.no_grad():
        assert not torch.allclose(with_ape(x)["res2"], without(x)["res2"])
        with_ape.absolute_pos_embed.zero_()
        torch.testing.assert_close(with_ape(x)["res2"], without(x)["res2"])


def test_official_init():
    b = D2SwinTransformer(**{**TINY, "embed_dim": 64, "num_heads": [2, 4, 8, 16]})
    fc1 = b.layers[2].blocks[0].mlp.fc1
    assert fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(fc1.bias == 0)
    assert torch.all(b.norm2.weight == 1) and torch.all(b.norm2.bias == 0)
    assert b.layers[0].blocks[0].attn.relative_position_index.dtype == torch.int64


def test_shifted_window_mask_separates_wrapped_regions():
    """4x4 map, window 4, shift 2: one window whose tokens fall in 4 regions of 2x2 (rolled) cells."""
    mask = swin.shifted_window_mask(4, 4, 4, 2, torch.device("cpu"))
    assert mask.shape == (1, 16, 16)
    region = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]).flatten()
    same = region[:, None] == region[None, :]
    assert torch.all(mask[0][same] == 0) and torch.all(mask[0][~same] == swin.ATTN_MASK_VALUE)
