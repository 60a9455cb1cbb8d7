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
# Official Mask2Former references checked the same way as the R50 ones (names, shapes, order, strict load).
REFERENCES = R50_REFERENCES + ["mask2former_ade20k_sem_swin_t"]
SEMASK_SWIN_L = "semask_ade20k_sem_semask_swin_l"
# Parameter elements of the official SeMask-Swin-L Mask2Former (tests/reference/README.md table).
SEMASK_SWIN_L_PARAMETERS = 222_632_383


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


def assert_state_dict_matches(model, expected):
    got = [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]
    missing = sorted({k for k, _, _ in expected} - {k for k, _, _ in got})
    unexpected = sorted({k for k, _, _ in got} - {k for k, _, _ in expected})
    assert not missing and not unexpected, f"missing: {missing[:10]}, unexpected: {unexpected[:10]}"
    expected_shapes = {k: (s, d) for k, s, d in expected}
    wrong = [(k, s, d, expected_shapes[k]) for k, s, d in got if expected_shapes[k] != (s, d)]
    assert not wrong, f"shape/dtype mismatches: {wrong[:10]}"
    assert [k for k, _, _ in got] == [k for k, _, _ in expected], "state-dict order differs from official"


def fake_official_state_dict(reference_dir, name):
    return {
        key: torch.full(shape, 0.5) for key, shape, _ in read_reference(os.path.join(reference_dir, f"{name}_state_dict.tsv"))
    }


@pytest.mark.parametrize("name", REFERENCES)
def test_state_dict_matches_official(reference_dir, name):
    expected = read_reference(os.path.join(reference_dir, f"{name}_state_dict.tsv"))
    assert_state_dict_matches(build_from_reference(reference_dir, name), expected)


@pytest.mark.parametrize("name", REFERENCES)
def test_official_state_dict_loads_strictly(reference_dir, name):
    """A state dict with exactly the official names and shapes loads with strict=True."""
    model = build_from_reference(reference_dir, name)
    result = model.load_state_dict(fake_official_state_dict(reference_dir, name), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.all(model.sem_seg_head.predictor.query_feat.weight == 0.5)


def test_semask_swin_l_matches_official(reference_dir):
    """The official SeMask-Mask2Former Swin-L config builds our model with the official keys, shapes, order
    and parameter count, and an official-layout state dict loads strictly (built once: Swin-L is large)."""
    model = build_from_reference(reference_dir, SEMASK_SWIN_L)
    assert type(model).__name__ == "SeMaskMaskFormer"
    assert_state_dict_matches(model, read_reference(os.path.join(reference_dir, f"{SEMASK_SWIN_L}_state_dict.tsv")))
    assert sum(p.numel() for p in model.parameters()) == SEMASK_SWIN_L_PARAMETERS
    # CATE_WEIGHT 0.4 of the official file is the prior loss weight.
    assert model.criterion.weight_dict["loss_sem_prior"] == pytest.approx(0.4)
    result = model.load_state_dict(fake_official_state_dict(reference_dir, SEMASK_SWIN_L), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    gamma = model.backbone.layers[3].semantic_layer.class_injection[0].gamma
    assert torch.all(gamma == 0.5)
