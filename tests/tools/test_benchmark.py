"""tools/benchmark.py and qsegformers/utils/benchmark.py: table and JSON on the toy config, generated
training batches, the training step really updating the model, size parsing, the median timer."""
import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

from qsegformers.engine import build_optimizer
from qsegformers.engine.defaults import get_qsegformers_cfg
from qsegformers.utils.benchmark import INSTANCES_PER_IMAGE, generated_batch, median_time, train_step

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "benchmark.py"
SEM_CFG = str(REPO / "configs" / "toy" / "semantic-segmentation" / "maskformer2_R18_toy.yaml")
SMALL = ["MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "64"]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("qseg_benchmark_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_table_and_json(tool, tmp_path, capsys):
    out = tmp_path / "bench.json"
    tool.main(["--config-file", SEM_CFG, "--sizes", "64", "96x64", "--batch", "2", "--warmup", "1",
               "--repeats", "2", "--mode", "both", "--json", str(out), "--opts", *SMALL])
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert [(r["mode"], r["size"]) for r in results] == [
        ("inference", [64, 64]), ("inference", [96, 64]), ("train", [64, 64]), ("train", [96, 64])]
    for r in results:
        assert r["batch"] == 2 and r["repeats"] == 2
        assert r["median_s"] > 0
        assert r["images_per_s"] == pytest.approx(2 / r["median_s"])
        assert r["peak_memory_mib"] > 0
        assert r["memory_kind"] == "process peak RSS (getrusage)"
        assert f"| {r['mode']:<9} | {r['size'][0]}x{r['size'][1]}" in printed
    assert "median ms" in printed and "images/s" in printed


def test_parse_size(tool):
    assert tool.parse_size("512") == (512, 512)
    assert tool.parse_size("480x640") == (480, 640)
    for bad in ("0", "12x", "axb", "1x2x3"):
        with pytest.raises(argparse.ArgumentTypeError):
            tool.parse_size(bad)


def test_generated_batch_and_train_step_update_the_model():
    batch = generated_batch(2, 64, 96, num_classes=6, with_targets=True)
    assert len(batch) == 2
    for item in batch:
        assert item["image"].shape == (3, 64, 96) and 0 <= item["image"].min() and item["image"].max() <= 255
        masks = item["instances"].gt_masks.tensor
        assert masks.shape == (INSTANCES_PER_IMAGE, 64, 96) and masks.flatten(1).any(1).all()
        assert ((item["instances"].gt_classes >= 0) & (item["instances"].gt_classes < 6)).all()
    cfg = get_qsegformers_cfg()
    cfg.merge_from_file(SEM_CFG)
    cfg.merge_from_list(SMALL + ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    losses = train_step(model, optimizer, batch)
    assert {"loss_ce", "loss_mask", "loss_dice"} <= set(losses)
    assert sum(losses.values()) > 0 and torch.isfinite(torch.tensor(list(losses.values()))).all()
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert any(k.startswith("backbone.") for k in changed)
    assert any(k.startswith("sem_seg_head.predictor.") for k in changed)


def test_median_time_counts_warmup_and_repeats():
    calls = []
    median = median_time(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=5)
    assert len(calls) == 7 and median >= 0
