"""D2ViT: output shapes and padding, position-embedding resampling, final norm, gradients, loading."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone

from qsegformers import add_qsegformers_config
from qsegformers.backbones.vit import D2ViT, interpolate_pos_embed

with warnings.catch_warnings():  # timm 1.0.22 imports torch.jit.interface, deprecated in torch 2.13
    warnings.simplefilter("ignore", DeprecationWarning)
    from timm.layers import resample_abs_pos_embed

TINY = dict(patch_size=16, embed_dim=24, depth=4, num_heads=2, pretrain_img_size=64)


def tiny_vit(**overrides):
    torch.manual_seed(0)
    return D2ViT(**{**TINY, "out_blocks": [2, 3], **overrides}).eval()


def test_registry_builds_from_config_and_odd_input_is_padded():
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "D2PlainViT"  # the spec's alias of D2ViT
    cfg.MODEL.VIT.EMBED_DIM, cfg.MODEL.VIT.DEPTH, cfg.MODEL.VIT.NUM_HEADS = 24, 4, 2
    cfg.MODEL.VIT.OUT_BLOCKS = [2, 4]
    model = build_backbone(cfg).eval()
    assert isinstance(model, D2ViT) and model.size_divisibility == 16
    assert len(model.blocks) == 4 and model.norm is None  # FINAL_NORM defaults to False
    assert {k: (s.channels, s.stride) for k, s in model.output_shape().items()} == {
        "blk2": (24, 16),
        "blk4": (24, 16),
    }
    image = torch.randn(2, 3, 257, 321)
    with torch.no_grad():
        out = model(image)
        padded = model(F.pad(image, (0, 336 - 321, 0, 272 - 257)))  # zero pad to 272 x 336 by hand
    assert sorted(out) == ["blk2", "blk4"]
    for name in out:
        assert out[name].shape == (2, 24, 17, 21)  # ceil(257/16), ceil(321/16)
        torch.testing.assert_close(out[name], padded[name], rtol=0, atol=0)


def test_only_blocks_up_to_the_deepest_output_are_built():
    model = tiny_vit(out_blocks=[1, 2])
    assert len(model.blocks) == 2
    assert not any(k.startswith("blocks.2.") for k in model.state_dict())


def test_pos_embed_identity_at_pretrain_grid_and_bicubic_elsewhere():
    torch.manual_seed(0)
    pos_embed = torch.randn(1, 1 + 4 * 4, 8)
    assert interpolate_pos_embed(pos_embed, (4, 4)) is pos_embed
    resized = interpolate_pos_embed(pos_embed, (6, 7))
    assert resized.shape == (1, 1 + 6 * 7, 8)
    torch.testing.assert_close(resized[:, :1], pos_embed[:, :1], rtol=0, atol=0)
    # Reference 1: timm's resampler with antialiasing off (mmseg's resize_pos_embed behaviour).
    reference = resample_abs_pos_embed(pos_embed, [6, 7], num_prefix_tokens=1, antialias=False)
    torch.testing.assert_close(resized, reference, rtol=1e-6, atol=1e-6)
    # Reference 2: the grid entry of token (r, c) is pos_embed[0, 1 + r*4 + c]; build the grid per channel.
    grid = torch.stack([pos_embed[0, 1:, ch].view(4, 4) for ch in range(8)])[None]
    expected = F.interpolate(grid, size=(6, 7), mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(resized[0, 1 + 2 * 7 + 5], expected[:, 2, 5], rtol=1e-6, atol=1e-6)


def test_forward_uses_the_resampled_pos_embed():
    model = tiny_vit()
    image = torch.randn(1, 3, 96, 112)
    with torch.no_grad():
        out = model(image)["blk3"]
        tokens = model.patch_embed(image).flatten(2).transpose(1, 2)
        tokens = torch.cat([model.cls_token, tokens], 1)
        grid = model.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(6, 7), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        tokens = tokens + torch.cat([model.pos_embed[:, :1], grid], 1)
        for block in model.blocks[:3]:
            tokens = block(tokens)
    torch.testing.assert_close(out, tokens[:, 1:].transpose(1, 2).reshape(1, 24, 6, 7), rtol=1e-5, atol=1e-5)


def test_final_norm_applies_to_the_deepest_output_only():
    plain = tiny_vit(final_norm=False)
    normed = tiny_vit(final_norm=True)
    normed.load_state_dict({**plain.state_dict(), "norm.weight": torch.rand(24) + 0.5, "norm.bias": torch.randn(24)})
    image = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        a, b = plain(image), normed(image)
    torch.testing.assert_close(b["blk2"], a["blk2"], rtol=0, atol=0)
    expected = F.layer_norm(a["blk3"].permute(0, 2, 3, 1), (24,), normed.norm.weight, normed.norm.bias, eps=1e-6)
    torch.testing.assert_close(b["blk3"], expected.permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("final_norm", [False, True])
def test_gradients_reach_every_parameter(final_norm):
    model = tiny_vit(drop_path_rate=0.1, final_norm=final_norm).train()
    out = model(torch.randn(2, 3, 40, 56))
    sum(v.square().mean() for v in out.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_activation_checkpointing_gives_the_same_gradients():
    plain, ckpt = tiny_vit().train(), tiny_vit(use_checkpoint=True).train()
    image = torch.randn(1, 3, 48, 48)
    for model in (plain, ckpt):
        sum(v.sum() for v in model(image).values()).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"out_blocks": [0, 2]}, "OUT_BLOCKS"),
        ({"out_blocks": [5]}, "OUT_BLOCKS"),
        ({"pretrain_img_size": 60}, "PRETRAIN_IMG_SIZE"),
    ],
)
def test_bad_settings_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        D2ViT(**{**TINY, "out_blocks": [2], **overrides})


def test_load_state_dict_resamples_a_pos_embed_of_another_grid():
    source = tiny_vit()
    target = tiny_vit(pretrain_img_size=96)
    target.load_state_dict(source.state_dict())
    expected = resample_abs_pos_embed(source.pos_embed.detach(), [6, 6], num_prefix_tokens=1, antialias=False)
    torch.testing.assert_close(target.pos_embed.detach(), expected, rtol=1e-6, atol=1e-6)


def test_checkpoint_without_usable_pos_embed_is_a_clear_error():
    state = tiny_vit().state_dict()
    del state["pos_embed"]  # what detectron2's checkpointer does with a pos_embed of the wrong shape
    with pytest.raises(ValueError, match="PRETRAIN_IMG_SIZE"):
        tiny_vit().load_state_dict(state, strict=False)
