"""Our official-layout configs merge to the same values as the official merged configs."""
import os

import pytest
import yaml
from detectron2.config import get_cfg

from qsegformers import add_qsegformers_config

pytestmark = pytest.mark.smoke  # also run on the current stack (.ci/run)

REPO = os.path.join(os.path.dirname(__file__), "..")
OURS_VS_OFFICIAL = [
    ("configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml", "mask2former_ade20k_sem_r50"),
    ("configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml", "mask2former_coco_pan_r50"),
    ("configs/ade20k/semantic-segmentation/swin/maskformer2_swin_tiny_bs16_160k.yaml", "mask2former_ade20k_sem_swin_t"),
]
# Keys that legitimately differ: where weights come from and the device the reference was dumped on.
NOT_COMPARED = {"MODEL.WEIGHTS", "MODEL.DEVICE"}


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = list(v) if isinstance(v, tuple) else v
    return out


def merged(path):
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.merge_from_file(path)
    return flatten(yaml.safe_load(cfg.dump()))


@pytest.mark.parametrize("ours,official", OURS_VS_OFFICIAL)
def test_config_equals_official_merge(reference_dir, ours, official):
    got = merged(os.path.join(REPO, ours))
    expected = merged(os.path.join(reference_dir, f"{official}_config.yaml"))
    diff = {k: (got.get(k), v) for k, v in expected.items() if k not in NOT_COMPARED and got.get(k) != v}
    assert not diff, f"{ours} differs from the official merged config: {diff}"


@pytest.mark.parametrize("path", sorted(
    os.path.relpath(os.path.join(d, f), REPO)
    for d, _, files in os.walk(os.path.join(REPO, "configs"))
    for f in files if f.endswith(".yaml")
))
def test_our_configs_run_no_code(path):
    """Our configs list values; only official files we load may contain python/object tags."""
    with open(os.path.join(REPO, path)) as f:
        assert "!!python" not in f.read()
