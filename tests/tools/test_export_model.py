"""tools/export_model.py: the toy semantic model exported to ONNX and TorchScript gives, under onnxruntime
and after reloading, MaskFormer's own semantic inference (through its list-of-dicts interface) within 1e-4."""
import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from PIL import Image

from qsegformers.engine.defaults import get_qsegformers_cfg

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "export_model.py"
SEM_CFG = str(REPO / "configs" / "toy" / "semantic-segmentation" / "maskformer2_R18_toy.yaml")
SMALL = ["MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8"]
HEIGHT, WIDTH = 64, 96  # multiples of the size divisibility (32): no padding, no crop
ATOL = 1e-4


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("qseg_export_model_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cfg(opts):
    cfg = get_qsegformers_cfg()
    cfg.merge_from_file(SEM_CFG)
    cfg.merge_from_list(opts + ["MODEL.DEVICE", "cpu"])
    return cfg


def test_onnx_and_torchscript_match_the_model(tool, tmp_path):
    # a random-init model saved as a checkpoint, with non-trivial norm statistics
    cfg = _cfg(SMALL)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("weights")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(tmp_path / "sample.png")

    out = tmp_path / "export"
    results = tool.main(["--config-file", SEM_CFG, "--output", str(out), "--sample-image", str(tmp_path / "sample.png"),
                         "--opts", *SMALL, "MODEL.WEIGHTS", str(tmp_path / "weights.pth")])
    assert all(r["ok"] for r in results.values())
    assert json.loads((out / "export.json").read_text())["onnx"]["max_abs_diff"] <= ATOL

    # reference: the model's own semantic inference (pure-PyTorch deformable attention), list-of-dicts API
    image = torch.as_tensor(np.asarray(Image.open(tmp_path / "sample.png").convert("RGB"), dtype=np.float32))
    image = image.permute(2, 0, 1)  # the toy configs use INPUT.FORMAT RGB
    reference_model = build_model(_cfg(SMALL + ["MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTN_IMPL", "pytorch"])).eval()
    DetectionCheckpointer(reference_model).load(str(tmp_path / "weights.pth"))
    with torch.no_grad():
        reference = reference_model([{"image": image}])[0]["sem_seg"].numpy()
    assert reference.shape == (6, HEIGHT, WIDTH)
    mean = np.array(cfg.MODEL.PIXEL_MEAN, dtype=np.float32)[:, None, None]
    std = np.array(cfg.MODEL.PIXEL_STD, dtype=np.float32)[:, None, None]
    x = ((image.numpy() - mean) / std)[None]

    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"image": x})[0]
    assert onnx_out.shape == (1, 6, HEIGHT, WIDTH)
    np.testing.assert_allclose(onnx_out[0], reference, atol=ATOL, rtol=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.load` is deprecated", category=DeprecationWarning)
        ts_out = torch.jit.load(str(out / "model.ts"))(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ts_out[0], reference, atol=ATOL, rtol=0)
    # the scores are not constant (a trivially exported graph would not pass by accident)
    assert reference.std() > 1e-3

    # the graph runs the deformable attention with standard ONNX GridSample, no custom-domain op
    graph = onnx.load(str(out / "model.onnx"))
    assert "GridSample" in {node.op_type for node in graph.graph.node}
    assert {node.domain for node in graph.graph.node} <= {"", "ai.onnx"}
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 16
