"""tools/convert_swin_to_d2.py: timm Swin-T weights load into our backbones and reproduce timm's features."""
import importlib.util
import os
import warnings

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from qsegformers.backbones.semask import D2SeMaskSwinTransformer
from qsegformers.backbones.swin import D2SwinTransformer

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # timm's hrnet uses torch.jit.interface
    import timm

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "convert_swin_to_d2.py")
TIMM_NAME = "swin_tiny_patch4_window7_224"
SWIN_T = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, drop_path_rate=0.0)
STAGE_NORMS = {f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")}


def load_tool():
    spec = importlib.util.spec_from_file_location("convert_swin_to_d2", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timm_swin(img_size):
    # always_partition keeps the 7x7 window (and its shift) on the 7x7 last stage, as the official Swin does.
    return timm.create_model(TIMM_NAME, pretrained=False, img_size=img_size, always_partition=True).eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(timm state dict with random weights incl. LayerNorms, path of the converted .pkl)."""
    torch.manual_seed(0)
    model = timm_swin(224)
    state = model.state_dict()
    for key, value in state.items():
        if value.is_floating_point():
            state[key] = value + 0.05 * torch.randn_like(value)  # every tensor distinct from its init
    folder = tmp_path_factory.mktemp("swin_convert")
    src, dst = str(folder / "timm_swin_t.pth"), str(folder / "swin_t_d2.pkl")
    torch.save(state, src)
    settings = load_tool().main([src, dst])
    assert settings == {"EMBED_DIM": 96, "DEPTHS": [2, 2, 6, 2], "NUM_HEADS": [3, 6, 12, 24], "WINDOW_SIZE": 7, "PATCH_SIZE": 4}
    return state, dst


def load_with_d2(model, path):
    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(path))
    return set(incompatible.missing_keys), set(incompatible.unexpected_keys)


def test_missing_keys_are_only_the_stage_norms(converted):
    missing, unexpected = load_with_d2(D2SwinTransformer(**SWIN_T), converted[1])
    assert missing == STAGE_NORMS and not unexpected


def test_semask_missing_keys_are_stage_norms_and_semantic_layers(converted):
    model = D2SeMaskSwinTransformer(num_classes=5, **SWIN_T)
    missing, unexpected = load_with_d2(model, converted[1])
    semantic = {k for k in model.state_dict() if ".semantic_layer." in k}
    assert len(semantic) == 4 * 11  # norm1 (2) + gamma + 4 Linear x (weight, bias)
    assert missing == STAGE_NORMS | semantic and not unexpected


@pytest.mark.parametrize("img_size", [(224, 224), (224, 448)])
def test_features_equal_timm(converted, img_size):
    state, path = converted
    reference = timm_swin(img_size)
    reference.load_state_dict(state)
    ours = D2SwinTransformer(**SWIN_T).eval()
    load_with_d2(ours, path)
    for i in range(4):  # compare the raw stage outputs: timm has no per-stage norms
        setattr(ours, f"norm{i}", nn.Identity())
    x = torch.randn(1, 3, *img_size)
    with torch.no_grad():
        feats = ours(x)
        final, stages = reference.forward_intermediates(x)
    for i, ref in enumerate(stages):
        got = feats[f"res{i + 2}"]
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # timm's final norm is ImageNet's norm3 equivalent: with it, res5 equals timm's normed output.
    ours.norm3 = nn.LayerNorm(768)
    ours.norm3.load_state_dict({"weight": state["norm.weight"], "bias": state["norm.bias"]})
    with torch.no_grad():
        res5 = ours(x)["res5"]
    torch.testing.assert_close(res5, final.permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)


def test_microsoft_layout_keeps_downsample_and_drops_classifier():
    """A Microsoft-layout dict keeps ``layers.i.downsample`` in place and drops attn_mask/norm/head."""
    tool = load_tool()
    ms = {
        "patch_embed.proj.weight": torch.zeros(8, 3, 4, 4),
        "layers.0.blocks.0.attn.relative_position_bias_table": torch.zeros(9, 2),
        "layers.0.blocks.0.attn_mask": torch.zeros(1),
        "layers.0.downsample.reduction.weight": torch.ones(16, 32),
        "layers.1.blocks.0.attn.relative_position_bias_table": torch.zeros(9, 4),
        "norm.weight": torch.zeros(16),
        "head.weight": torch.zeros(10, 16),
    }
    out, settings = tool.convert_swin(ms, prefix="backbone.")
    assert set(out) == {
        "backbone.patch_embed.proj.weight",
        "backbone.layers.0.blocks.0.attn.relative_position_bias_table",
        "backbone.layers.0.blocks.0.attn.relative_position_index",
        "backbone.layers.0.downsample.reduction.weight",
        "backbone.layers.1.blocks.0.attn.relative_position_bias_table",
        "backbone.layers.1.blocks.0.attn.relative_position_index",
    }
    assert settings["WINDOW_SIZE"] == 2 and settings["NUM_HEADS"] == [2, 4]
    # 2x2 window: index of (token i, token j) = (dy + 1) * 3 + (dx + 1), written out by hand.
    expected = torch.tensor([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    assert torch.equal(out["backbone.layers.0.blocks.0.attn.relative_position_index"], expected)
    with pytest.raises(ValueError, match="unsupported keys"):
        tool.convert_swin({**ms, "layers.0.blocks.0.attn.logit_scale": torch.zeros(1)})
