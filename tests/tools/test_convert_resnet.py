"""tools/convert_torchvision_resnet_to_d2.py: torchvision ResNet weights -> detectron2's ResNet backbone."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone

from qsegformers import add_qsegformers_config

TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_torchvision_resnet_to_d2.py"
STAGES = ["res2", "res3", "res4", "res5"]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("convert_torchvision_resnet_to_d2", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_torchvision_resnet(name):
    """A torchvision ResNet with random BN affine parameters and running statistics."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.0)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def d2_resnet(settings, norm="FrozenBN", freeze_at=2):
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.RESNETS.OUT_FEATURES = STAGES
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at  # frozen stages use FrozenBN whatever NORM says
    for key, value in settings.items():
        cfg.MODEL.RESNETS[key] = value
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    torch.manual_seed(1)
    return build_backbone(cfg).eval()


def torchvision_stage_outputs(model, x):
    """layer1..layer4 outputs of a torchvision ResNet, computed step by step."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    outputs = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        outputs.append(x)
    return outputs


@pytest.mark.parametrize("name, depth", [("resnet18", 18), ("resnet50", 50)])
def test_converted_weights_reproduce_torchvision_stages(tool, tmp_path, name, depth):
    source = random_torchvision_resnet(name)
    torch.save(source.state_dict(), tmp_path / "tv.pth")
    settings = tool.main([str(tmp_path / "tv.pth"), str(tmp_path / "d2.pkl")])
    assert settings["DEPTH"] == depth and settings["STRIDE_IN_1X1"] is False

    model = d2_resnet(settings)
    checkpointer = DetectionCheckpointer(model)
    report = checkpointer._load_model(checkpointer._load_file(str(tmp_path / "d2.pkl")))
    assert report.missing_keys == [] and report.incorrect_shapes == []

    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours = model(image)
        expected = torchvision_stage_outputs(source, image)
    for stage, reference in zip(STAGES, expected):
        scale = reference.abs().max().item()
        torch.testing.assert_close(ours[stage], reference, rtol=1e-5, atol=1e-5 * max(scale, 1.0), msg=stage)


@pytest.mark.parametrize("name, depth", [("resnet34", 34), ("resnet101", 101)])
def test_converted_names_and_shapes_match_detectron2_resnet(tool, name, depth):
    state = getattr(torchvision.models, name)().state_dict()
    converted, settings = tool.convert_torchvision_resnet(state)
    assert settings["DEPTH"] == depth
    ours = d2_resnet(settings, norm="BN", freeze_at=0).state_dict()  # BN has num_batches_tracked too
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert len(converted) == len(state) - 2  # fc.weight and fc.bias dropped


@pytest.mark.parametrize(
    "key, expected",
    [
        ("conv1.weight", "stem.conv1.weight"),
        ("bn1.running_var", "stem.conv1.norm.running_var"),
        ("layer1.0.conv3.weight", "res2.0.conv3.weight"),
        ("layer3.22.bn2.bias", "res4.22.conv2.norm.bias"),
        ("layer4.0.downsample.0.weight", "res5.0.shortcut.weight"),
        ("layer2.0.downsample.1.running_mean", "res3.0.shortcut.norm.running_mean"),
    ],
)
def test_rename_rules(tool, key, expected):
    assert tool.rename_torchvision_key(key) == expected


def test_unknown_key_is_refused(tool):
    with pytest.raises(ValueError, match="layer1.0.se.fc1.weight"):
        tool.rename_torchvision_key("layer1.0.se.fc1.weight")
