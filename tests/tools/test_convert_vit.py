"""tools/convert_timm_vit_to_d2.py: timm ViT weights -> D2ViT, checked against timm's own block outputs."""
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone
from safetensors.torch import save_file
from torch import nn

from qsegformers import add_qsegformers_config
from qsegformers.backbones.vit import D2ViT

with warnings.catch_warnings():  # timm 1.0.22 imports torch.jit.interface, deprecated in torch 2.13
    warnings.simplefilter("ignore", DeprecationWarning)
    import timm
    from timm.layers import resample_abs_pos_embed
    from timm.models.vision_transformer import VisionTransformer

TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_timm_vit_to_d2.py"
DIM, DEPTH, HEADS, IMG = 48, 4, 3, 64


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("convert_timm_vit_to_d2", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_timm_vit(img_size=IMG, **kwargs):
    """A small timm ViT with every parameter perturbed (biases, norms and cls token are not left at init)."""
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=img_size, patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=7, **kwargs
    )
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


class Wrapper(nn.Module):
    """Stands for a meta-architecture: detectron2 models keep their backbone under ``backbone``."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


def d2_vit(out_blocks, final_norm=False, pretrain_img_size=IMG):
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "D2ViT"
    vit = cfg.MODEL.VIT
    vit.EMBED_DIM, vit.DEPTH, vit.NUM_HEADS, vit.PRETRAIN_IMG_SIZE = DIM, DEPTH, HEADS, pretrain_img_size
    vit.OUT_BLOCKS, vit.FINAL_NORM = out_blocks, final_norm
    torch.manual_seed(1)
    return Wrapper(build_backbone(cfg)).eval()


def load(model, path):
    """Load like MODEL.WEIGHTS does and return detectron2's incompatible-keys report."""
    checkpointer = DetectionCheckpointer(model)
    return checkpointer._load_model(checkpointer._load_file(str(path)))


def timm_maps(model, image, indices):
    """timm's block outputs (0-based indices), class token removed, as B x D x h x w maps."""
    return model.forward_intermediates(image, indices=indices, output_fmt="NCHW", intermediates_only=True)


@pytest.mark.parametrize("source_format, output_format", [(".pth", ".pkl"), (".safetensors", ".pth")])
def test_converted_weights_reproduce_timm_block_outputs(tool, tmp_path, source_format, output_format):
    source = random_timm_vit()
    src, dst = tmp_path / f"timm{source_format}", tmp_path / f"d2{output_format}"
    if source_format == ".safetensors":
        save_file(source.state_dict(), str(src))
    else:
        torch.save({"state_dict": source.state_dict()}, src)
    settings = tool.main([str(src), str(dst)])
    assert settings == {"PATCH_SIZE": 16, "EMBED_DIM": DIM, "DEPTH": DEPTH, "PRETRAIN_IMG_SIZE": IMG}

    model = d2_vit(out_blocks=[2, 4], final_norm=True)
    report = load(model, dst)
    assert report.missing_keys == [] and report.incorrect_shapes == []
    ours = model.backbone.state_dict()
    assert set(ours) <= set(source.state_dict())
    for name, value in ours.items():
        torch.testing.assert_close(value, source.state_dict()[name], rtol=0, atol=0, msg=name)

    image = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        out = model.backbone(image)
        (blk2,) = timm_maps(source, image, [1])
        final = source.forward_features(image)[:, 1:].transpose(1, 2).reshape(2, DIM, 4, 4)  # with timm's norm
    torch.testing.assert_close(out["blk2"], blk2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["blk4"], final, rtol=1e-5, atol=1e-5)


def test_larger_odd_input_matches_timm_on_padded_input(tool, tmp_path):
    source = random_timm_vit()
    torch.save(source.state_dict(), tmp_path / "timm.pth")
    tool.main([str(tmp_path / "timm.pth"), str(tmp_path / "d2.pkl")])
    model = d2_vit(out_blocks=[1, 3])
    load(model, tmp_path / "d2.pkl")
    # timm built for the padded 96 x 112 input, its grid resampled without antialiasing (mmseg/SegViT).
    reference = random_timm_vit(img_size=(96, 112))
    state = dict(source.state_dict())
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [6, 7], num_prefix_tokens=1, antialias=False)
    reference.load_state_dict(state)
    image = torch.randn(1, 3, 90, 100)
    with torch.no_grad():
        out = model.backbone(image)
        expected = timm_maps(reference, F.pad(image, (0, 12, 0, 6)), [0, 2])
    torch.testing.assert_close(out["blk1"], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["blk3"], expected[1], rtol=1e-5, atol=1e-5)


def test_pretrain_size_mismatch_is_an_error_or_resampled_by_the_converter(tool, tmp_path):
    source = random_timm_vit()
    torch.save(source.state_dict(), tmp_path / "timm.pth")
    tool.main([str(tmp_path / "timm.pth"), str(tmp_path / "d2_64.pkl")])
    with pytest.raises(ValueError, match="PRETRAIN_IMG_SIZE"):
        load(d2_vit(out_blocks=[2], pretrain_img_size=96), tmp_path / "d2_64.pkl")

    settings = tool.main([str(tmp_path / "timm.pth"), str(tmp_path / "d2_96.pkl"), "--pretrain-img-size", "96"])
    assert settings["PRETRAIN_IMG_SIZE"] == 96
    model = d2_vit(out_blocks=[2], pretrain_img_size=96)
    assert load(model, tmp_path / "d2_96.pkl").missing_keys == []
    expected = resample_abs_pos_embed(source.pos_embed.detach(), [6, 6], num_prefix_tokens=1, antialias=False)
    torch.testing.assert_close(model.backbone.pos_embed.detach(), expected, rtol=1e-6, atol=1e-6)


def test_vit_b16_layout_matches_timm_key_for_key(tool):
    with torch.device("meta"):
        timm_state = timm.create_model("vit_base_patch16_224", pretrained=False).state_dict()
        ours = D2ViT(
            embed_dim=768, depth=12, num_heads=12, pretrain_img_size=224, out_blocks=[6, 8, 12], final_norm=True
        ).state_dict()
    converted, settings = tool.convert_timm_vit(timm_state, prefix="")
    assert settings == {"PATCH_SIZE": 16, "EMBED_DIM": 768, "DEPTH": 12, "PRETRAIN_IMG_SIZE": 224}
    assert not any(k.startswith("head.") for k in converted) and "head.weight" in timm_state
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ours.items()}


def test_unsupported_timm_variant_is_refused_with_its_keys(tool):
    layer_scale = random_timm_vit(init_values=1e-5)  # DeiT-III style ls1/ls2 gammas
    with pytest.raises(ValueError, match=r"blocks\.0\.ls1\.gamma"):
        tool.convert_timm_vit(layer_scale.state_dict())
