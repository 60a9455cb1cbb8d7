"""Models built from the official merged configs have exactly the official state-dict keys and shapes."""
import json
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import qsegformers
from qsegformers import add_qsegformers_config

R50_REFERENCES = ["mask2former_ade20k_sem_r50", "mask2former_coco_pan_r50"]


def read_reference(path):
    """Return [(key, shape tuple, dtype str)] from a reference TSV (header line skipped)."""
    rows = []
    with open(path) as f:
        next(f)
        for line in f:
            key, shape, dtype = line.rstrip("\n").split("\t")
            rows.append((key, tuple(json.loads(shape)), dtype))
    return rows


def build_from_reference(reference_dir, name):
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.merge_from_file(os.path.join(reference_dir, f"{name}_config.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    return build_model(cfg)


@pytest.mark.parametrize("name", R50_REFERENCES)
def test_state_dict_matches_official(reference_dir, name):
    expected = read_reference(os.path.join(reference_dir, f"{name}_state_dict.tsv"))
    model = build_from_reference(reference_dir, name)
    got = [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]
    missing = sorted({k for k, _, _ in expected} - {k for k, _, _ in got})
    unexpected = sorted({k for k, _, _ in got} - {k for k, _, _ in expected})
    assert not missing and not unexpected, f"missing: {missing[:10]}, unexpected: {unexpected[:10]}"
    expected_shapes = {k: (s, d) for k, s, d in expected}
    wrong = [(k, s, d, expected_shapes[k]) for k, s, d in got if expected_shapes[k] != (s, d)]
    assert not wrong, f"shape/dtype mismatches: {wrong[:10]}"
    assert [k for k, _, _ in got] == [k for k, _, _ in expected], "state-dict order differs from official"


@pytest.mark.parametrize("name", R50_REFERENCES)
def test_official_state_dict_loads_strictly(reference_dir, name):
    """A state dict with exactly the official names and shapes loads with strict=True."""
    model = build_from_reference(reference_dir, name)
    fake_official = {
        key: torch.full(shape, 0.5) for key, shape, _ in read_reference(os.path.join(reference_dir, f"{name}_state_dict.tsv"))
    }
    result = model.load_state_dict(fake_official, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.all(model.sem_seg_head.predictor.query_feat.weight == 0.5)
