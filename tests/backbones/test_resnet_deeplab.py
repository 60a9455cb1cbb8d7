"""build_resnet_deeplab_backbone: shapes and strides under dilation, equality with detectron2's ResNet,
the DeepLab stem, multi-grid receptive fields, parameter counts, config checks and the PFT R101c configs."""
import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone, build_model
from torch import nn

from qsegformers import add_qsegformers_config
from qsegformers.backbones.resnet_deeplab import DeepLabStem
from qsegformers.config import check_unsupported_keys

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
PFT_R101C = {
    "configs/ade20k/semantic-segmentation/pft/pft_R101c_bs16_160k.yaml": 150,
    "configs/coco-stuff-10k/semantic-segmentation/pft/pft_R101c_bs32_60k.yaml": 171,
    "configs/pascal-context-59/semantic-segmentation/pft/pft_R101c_bs16_40k.yaml": 59,
}
DEEPLAB = "build_resnet_deeplab_backbone"
D2 = "build_resnet_backbone"
FEATURES = ["res2", "res3", "res4", "res5"]
TINY_WIDTH, TINY_RES2, TINY_STEM = 4, 16, 8  # a bottleneck R50 with channels 16/32/64/128 at res2..res5


def tiny_cfg(name=DEEPLAB, **resnet_keys):
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.MODEL.BACKBONE.NAME = name
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    r = cfg.MODEL.RESNETS
    r.DEPTH, r.WIDTH_PER_GROUP, r.RES2_OUT_CHANNELS, r.STEM_OUT_CHANNELS = 50, TINY_WIDTH, TINY_RES2, TINY_STEM
    r.NORM, r.STRIDE_IN_1X1, r.OUT_FEATURES = "BN", False, FEATURES
    for key, value in resnet_keys.items():
        r[key] = value
    return cfg


def count(module):
    return sum(p.numel() for p in module.parameters())


def halve(size, times):
    for _ in range(times):
        size = math.ceil(size / 2)  # every stride-2 conv / pool here pads so that it rounds up
    return size


@pytest.mark.parametrize("stem", ["basic", "deeplab"])
@pytest.mark.parametrize("res4_dilation,res5_dilation,strides", [
    (1, 1, [4, 8, 16, 32]),
    (1, 2, [4, 8, 16, 16]),
    (1, 4, [4, 8, 16, 16]),
    (2, 4, [4, 8, 8, 8]),
])
def test_shapes_strides_and_channels_at_odd_size(stem, res4_dilation, res5_dilation, strides):
    torch.manual_seed(0)
    backbone = build_backbone(tiny_cfg(STEM_TYPE=stem, RES4_DILATION=res4_dilation, RES5_DILATION=res5_dilation))
    channels = [TINY_RES2 * 2 ** i for i in range(4)]
    shapes = backbone.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == dict(zip(FEATURES, zip(channels, strides)))
    h, w = 97, 75
    out = backbone(torch.randn(2, 3, h, w))
    for name, c, s in zip(FEATURES, channels, strides):
        assert out[name].shape == (2, c, halve(h, int(math.log2(s))), halve(w, int(math.log2(s)))), name


@pytest.mark.parametrize("res5_dilation", [1, 2])
def test_basic_stem_equals_detectron2_resnet_with_the_same_weights(res5_dilation):
    torch.manual_seed(0)
    reference = build_backbone(tiny_cfg(D2, RES5_DILATION=res5_dilation))
    ours = build_backbone(tiny_cfg(STEM_TYPE="basic", RES5_DILATION=res5_dilation))
    for m in reference.modules():  # non-trivial norm statistics, so that the norms matter too
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    state = reference.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in state.items()}
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 67, 45)
    expected, got = reference.eval()(x), ours.eval()(x)
    for name in FEATURES:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    assert ours.output_shape() == reference.output_shape()


def test_deeplab_stem_parameter_names_shapes_and_values():
    torch.manual_seed(0)
    backbone = build_backbone(tiny_cfg(STEM_TYPE="deeplab"))
    assert isinstance(backbone.stem, DeepLabStem)
    half = TINY_STEM // 2
    stem_state = {k: tuple(v.shape) for k, v in backbone.state_dict().items() if k.startswith("stem.")}
    expected = {}
    for conv, (cin, cout) in {"conv1": (3, half), "conv2": (half, half), "conv3": (half, TINY_STEM)}.items():
        expected[f"stem.{conv}.weight"] = (cout, cin, 3, 3)
        for buf in ("weight", "bias", "running_mean", "running_var"):
            expected[f"stem.{conv}.norm.{buf}"] = (cout,)
        expected[f"stem.{conv}.norm.num_batches_tracked"] = ()
    assert stem_state == expected
    assert backbone.res2[0].conv1.in_channels == TINY_STEM  # res2 reads the 128-channel-style stem output
    # values: conv(stride 2) -> BN -> ReLU, conv -> BN -> ReLU, conv -> BN -> ReLU, 3x3 max-pool stride 2
    stem = backbone.stem.eval()
    for conv in (stem.conv1, stem.conv2, stem.conv3):
        conv.norm.running_mean.uniform_(-0.2, 0.2)
        conv.norm.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 33, 21)
    y = x
    for conv, stride in ((stem.conv1, 2), (stem.conv2, 1), (stem.conv3, 1)):
        n = conv.norm
        y = F.conv2d(y, conv.weight, stride=stride, padding=1)
        y = (y - n.running_mean[:, None, None]) / torch.sqrt(n.running_var[:, None, None] + n.eps)
        y = torch.relu(y * n.weight[:, None, None] + n.bias[:, None, None])
    y = F.max_pool2d(y, 3, stride=2, padding=1)
    torch.testing.assert_close(stem(x), y, rtol=1e-5, atol=1e-6)
    assert y.shape[-2:] == (9, 6)


def bottleneck_params(cin, mid, cout):
    """1x1 (cin->mid), 3x3 (mid->mid), 1x1 (mid->cout), projection shortcut when widths differ; no biases."""
    return cin * mid + 9 * mid * mid + mid * cout + (cin * cout if cin != cout else 0)


def resnet101_params(stem_type):
    """R-101 (FrozenBN: norms have no parameters) counted from the architecture, not from the code."""
    if stem_type == "deeplab":
        stem, cin = 3 * 64 * 9 + 64 * 64 * 9 + 64 * 128 * 9, 128
    else:
        stem, cin = 3 * 64 * 7 * 7, 64
    total = stem
    for blocks, mid in zip([3, 4, 23, 3], [64, 128, 256, 512]):
        cout = 4 * mid
        total += bottleneck_params(cin, mid, cout) + (blocks - 1) * bottleneck_params(cout, mid, cout)
        cin = cout
    return total


def r101c_cfg():
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs/ade20k/semantic-segmentation/pft/pft_R101c_bs16_160k.yaml"))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    return cfg


def test_r101c_parameter_count_by_hand():
    # 42,394,816 conv weights in torchvision's R-101 (no fc, no norms); the DeepLab stem adds 102,912 and res2's wider
    # input adds 20,480 (its first 1x1 conv and projection shortcut read 128 instead of 64 channels).
    assert resnet101_params("basic") == 42_394_816
    assert resnet101_params("deeplab") - resnet101_params("basic") == 102_912 + 20_480
    backbone = build_backbone(r101c_cfg())
    assert isinstance(backbone.stem, DeepLabStem)
    assert count(backbone) == resnet101_params("deeplab") == 42_518_208
    assert {k: (v.channels, v.stride) for k, v in backbone.output_shape().items()} == {
        "res2": (256, 4), "res3": (512, 8), "res4": (1024, 16), "res5": (2048, 32)
    }


def positive_stage(stage):
    """Make every activation of ``stage`` positive for positive inputs: then ReLUs never cut gradients."""
    with torch.no_grad():
        for m in stage.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.abs_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.fill_(0.0)
    return stage.eval()


@pytest.mark.parametrize("res5_dilation,multi_grid", [(2, [1, 1, 1]), (2, [1, 2, 4]), (4, [1, 1, 1]), (4, [1, 2, 1])])
def test_res5_multi_grid_dilations_set_the_receptive_field(res5_dilation, multi_grid):
    torch.manual_seed(0)
    backbone = build_backbone(tiny_cfg(RES5_DILATION=res5_dilation, RES5_MULTI_GRID=multi_grid))
    dilations = [res5_dilation * g for g in multi_grid]
    assert [b.conv2.dilation for b in backbone.res5] == [(d, d) for d in dilations]
    # A 3x3 conv with dilation d reads offsets {-d, 0, d}; 1x1 convs and shortcuts read offset 0. With
    # stride 1, an output pixel of res5 therefore reads exactly the res4 offsets sum(a_i * d_i), a_i in {-1, 0, 1}.
    stage = positive_stage(backbone.res5)
    size, centre = 41, 20
    x = torch.rand(1, TINY_RES2 * 4, size, size, requires_grad=True)
    out = stage(x)
    assert out.shape[-2:] == (size, size)
    out[0, :, centre, centre].sum().backward()
    rows = torch.nonzero(x.grad.abs().sum(dim=(0, 1, 3)) > 0).flatten()
    cols = torch.nonzero(x.grad.abs().sum(dim=(0, 1, 2)) > 0).flatten()
    offsets = {sum(a * d for a, d in zip(signs, dilations)) for signs in itertools.product((-1, 0, 1), repeat=3)}
    expected = sorted(centre + o for o in offsets)
    assert rows.tolist() == expected and cols.tolist() == expected


@pytest.mark.parametrize("keys,message", [
    ({"RES4_DILATION": 2, "RES5_DILATION": 1}, "RES4_DILATION = 2 needs MODEL.RESNETS.RES5_DILATION = 4"),
    ({"RES4_DILATION": 2, "RES5_DILATION": 2}, "RES4_DILATION = 2 needs MODEL.RESNETS.RES5_DILATION = 4"),
    ({"RES4_DILATION": 4, "RES5_DILATION": 4}, r"RES4_DILATION = 4 must be one of \[1, 2\]"),
    ({"RES5_DILATION": 3}, r"RES5_DILATION = 3 must be one of \[1, 2, 4\]"),
    ({"RES5_MULTI_GRID": [1, 2]}, r"RES5_MULTI_GRID = \[1, 2\] needs one factor per res5 block: ResNet-50 has 3"),
    ({"STEM_TYPE": "vit"}, r"STEM_TYPE = 'vit' is unknown; choose one of \['basic', 'deeplab'\]"),
    ({"DEPTH": 18}, "DEPTH = 18 is not built by build_resnet_deeplab_backbone"),
    ({"STEM_TYPE": "deeplab", "STEM_OUT_CHANNELS": 9}, "STEM_OUT_CHANNELS must be even, got 9"),
])
def test_unsupported_combinations_fail_clearly(keys, message):
    with pytest.raises(ValueError, match=message):
        build_backbone(tiny_cfg(**keys))


def test_deeplab_keys_are_rejected_with_detectron2_resnet_and_accepted_with_the_deeplab_one():
    values = {"RES4_DILATION": 2, "RES5_DILATION": 4, "RES5_MULTI_GRID": [1, 2, 4], "STEM_TYPE": "deeplab"}
    with pytest.raises(ValueError) as info:
        check_unsupported_keys(tiny_cfg(D2, **values))
    message = str(info.value)
    for expected in ("MODEL.RESNETS.RES4_DILATION = 2", "MODEL.RESNETS.RES5_MULTI_GRID = [1, 2, 4]",
                     "MODEL.RESNETS.STEM_TYPE = 'deeplab'", "'build_resnet_deeplab_backbone'"):
        assert expected in message, expected
    assert "RES5_DILATION = 4" not in message  # detectron2's own key, honoured by build_resnet_backbone
    for key, value in values.items():  # each key on its own is caught
        if key != "RES5_DILATION":
            with pytest.raises(ValueError, match=f"MODEL.RESNETS.{key} = "):
                check_unsupported_keys(tiny_cfg(D2, **{key: value}))
    check_unsupported_keys(tiny_cfg(D2))
    check_unsupported_keys(tiny_cfg(DEEPLAB, **values))


def test_pft_r101c_configs_merge_and_the_ade20k_model_matches_the_paper_size():
    for path, num_classes in PFT_R101C.items():
        cfg = get_cfg()
        add_qsegformers_config(cfg)
        cfg.merge_from_file(os.path.join(REPO, path))
        check_unsupported_keys(cfg)
        r = cfg.MODEL.RESNETS
        assert (cfg.MODEL.BACKBONE.NAME, r.DEPTH, r.STEM_TYPE, r.STEM_OUT_CHANNELS) == (DEEPLAB, 101, "deeplab", 128)
        assert (r.RES4_DILATION, r.RES5_DILATION, list(r.RES5_MULTI_GRID)) == (1, 1, [1, 1, 1])
        assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == num_classes
    torch.manual_seed(0)
    model = build_model(r101c_cfg())
    params = count(model)
    assert abs(params / 1e6 - 81) / 81 < 0.03, params  # paper Tab. II: 81M
    assert count(model.backbone) == resnet101_params("deeplab")
    assert count(model.sem_seg_head.predictor) == 30_824_451  # spec 2.7: the PFT decoder
