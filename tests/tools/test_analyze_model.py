"""tools/analyze_model.py and qsegformers/utils/flop_count.py: parameter table, FLOP handles checked against
hand-computed counts, input-size scaling, both deformable-attention paths, listed uncounted ops."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from fvcore.nn import FlopCountAnalysis
from torch import nn

from qsegformers.engine.defaults import get_qsegformers_cfg
from qsegformers.ops.ms_deform_attn import compiled_kernel_available, ms_deform_attn
from qsegformers.utils.flop_count import (
    GRID_SAMPLER_OP,
    MS_DEFORM_ATTN_OP,
    SDPA_OP,
    grid_sampler_flop_jit,
    ms_deform_attn_flop_jit,
    sdpa_flop_jit,
)

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "analyze_model.py"
SEM_CFG = str(REPO / "configs" / "toy" / "semantic-segmentation" / "maskformer2_R18_toy.yaml")
SMALL = ["MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8"]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("qseg_analyze_model_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Op(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _count(fn, inputs, op, handle):
    analysis = FlopCountAnalysis(_Op(fn), inputs).set_op_handle(**{op: handle})
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis.total()


def test_grid_sample_and_attention_handles_match_hand_counts():
    x, grid = torch.randn(2, 3, 8, 8), torch.rand(2, 5, 7, 2) * 2 - 1
    bilinear = _count(lambda a, g: F.grid_sample(a, g, mode="bilinear", align_corners=False), (x, grid),
                      GRID_SAMPLER_OP, grid_sampler_flop_jit)
    assert bilinear == 4 * 2 * 3 * 5 * 7  # 4 corners per output element and channel
    nearest = _count(lambda a, g: F.grid_sample(a, g, mode="nearest", align_corners=False), (x, grid),
                     GRID_SAMPLER_OP, grid_sampler_flop_jit)
    assert nearest == 0
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 10, 8), torch.randn(2, 4, 10, 3)
    sdpa = _count(F.scaled_dot_product_attention, (q, k, v), SDPA_OP, sdpa_flop_jit)
    assert sdpa == 2 * 4 * 6 * 10 * 8 + 2 * 4 * 6 * 10 * 3  # QK^T then AV


def _deform_inputs(n=2, lq=5, m=2, d=4, points=3):
    shapes = torch.tensor([[4, 6], [2, 3]])
    start = torch.tensor([0, 24])
    value = torch.randn(n, 30, m, d)
    locations = torch.rand(n, lq, m, 2, points, 2)
    weights = torch.rand(n, lq, m, 2, points)
    return value, shapes, start, locations, weights


def test_ms_deform_attn_op_counts_like_its_pytorch_path():
    assert compiled_kernel_available(), "qsegformers._C is not built (pip install -e .)"
    inputs = _deform_inputs()
    hand = 4 * 2 * 5 * 2 * 2 * 3 * 4  # 4 * N * Lq * M * L * P * D
    compiled = _count(lambda *a: ms_deform_attn(*a, impl="compiled"), inputs, MS_DEFORM_ATTN_OP,
                      ms_deform_attn_flop_jit)
    pytorch = _count(lambda *a: ms_deform_attn(*a, impl="pytorch"), inputs, GRID_SAMPLER_OP, grid_sampler_flop_jit)
    assert compiled == hand
    assert pytorch == hand


def _model_params(opts):
    cfg = get_qsegformers_cfg()
    cfg.merge_from_file(SEM_CFG)
    cfg.merge_from_list(opts + ["MODEL.DEVICE", "cpu"])
    return sum(p.numel() for p in build_model(cfg).parameters())


def test_table_params_flop_scaling_and_uncounted_ops(tool, tmp_path, capsys):
    small = tool.main(["--config-file", SEM_CFG, "--input-size", "64", "64", "--json", str(tmp_path / "a.json"),
                       "--opts", *SMALL])
    printed = capsys.readouterr().out
    expected_params = _model_params(SMALL)
    assert f"exact parameter count: {expected_params}" in printed
    for row in ("backbone", "pixel decoder", "transformer decoder", "total"):
        assert f"| {row} " in printed
    assert "GFLOPs @64x64" in printed
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["params"]["total"] == expected_params
    assert sum(saved["params"][p] for p in ("backbone", "pixel decoder", "transformer decoder")) == expected_params
    assert saved["flops"]["total"] == pytest.approx(sum(v for k, v in saved["flops"].items() if k != "total"))
    # ops that count 0 or cannot be counted are listed, with their number of calls
    assert saved["zero_flop_ops"]["aten::softmax"] > 0
    assert saved["unsupported_ops"]["aten::cumsum"] > 0  # sine position embedding
    assert "aten::cumsum x" in printed and "aten::softmax x" in printed

    # the ResNet backbone is convolutions only (BN and pooling count 0): 4x the FLOPs at twice the side
    large = tool.main(["--config-file", SEM_CFG, "--input-size", "128", "128", "--opts", *SMALL])
    assert large.flops["backbone"] == pytest.approx(4 * small.flops["backbone"], rel=1e-9)
    assert large.flops["pixel decoder"] > 3 * small.flops["pixel decoder"]

    # the pure-PyTorch deformable attention is counted like the compiled op
    pytorch = tool.main(["--config-file", SEM_CFG, "--input-size", "64", "64",
                         "--opts", *SMALL, "MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTN_IMPL", "pytorch"])
    assert pytorch.flops["pixel decoder"] == pytest.approx(small.flops["pixel decoder"], rel=1e-9)
    assert pytorch.flops["total"] == pytest.approx(small.flops["total"], rel=1e-9)


def test_vit_backbone_is_traced_and_scales_with_tokens(tool):
    """The ViT's position-embedding resize is traceable (shape entries are tensors under tracing). Per
    token, patch embedding, qkv/proj and MLP cost the same, so at twice the side (4x the tokens) the
    backbone costs more than 4x (attention is quadratic in the tokens) and less than 16x."""
    segvit = str(REPO / "configs" / "toy" / "semantic-segmentation" / "segvit_tiny_toy.yaml")
    small = tool.main(["--config-file", segvit, "--input-size", "64", "64"])
    large = tool.main(["--config-file", segvit, "--input-size", "128", "128"])
    assert small.params["backbone"] > 0 and small.flops["backbone"] > 0
    assert 4 * small.flops["backbone"] < large.flops["backbone"] < 16 * small.flops["backbone"]
