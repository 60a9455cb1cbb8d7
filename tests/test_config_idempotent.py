"""add_qsegformers_config is idempotent: a second call leaves the config exactly as one call does, the MP-Former
keys included, and official MP-Former configs still merge and pass the compatibility-key check."""
import os

import pytest
from detectron2.config import get_cfg

from qsegformers.config import add_qsegformers_config, check_unsupported_keys
from qsegformers.decoders.mp_config import mp_options

# Keys that add_mp_config declares inside MODEL.MASK_FORMER (lost when MASK_FORMER is re-declared).
MP_KEYS_IN_MASK_FORMER = ("DN_MODE", "DN_RATIO", "LAST_Q_RATIO", "ALL_LY_DN", "DN_NO_LB", "HEAD_DN", "LB_NOISE_RATIO")


def _cfg(calls):
    cfg = get_cfg()
    for _ in range(calls):
        add_qsegformers_config(cfg)
    return cfg


def test_second_call_changes_nothing():
    once, twice = _cfg(1), _cfg(2)
    assert twice.dump() == once.dump()
    for key in MP_KEYS_IN_MASK_FORMER:
        assert hasattr(twice.MODEL.MASK_FORMER, key), key
    check_unsupported_keys(twice)  # raised a bare KeyError: 'DN_MODE' before
    assert mp_options(twice) == mp_options(once)


@pytest.mark.parametrize("name", ["mpformer_coco_ins_r50", "mpformer_coco_pan_r50"])
def test_official_mp_former_configs_merge_after_two_calls(reference_dir, name):
    path = os.path.join(reference_dir, f"{name}_config.yaml")
    once, twice = _cfg(1), _cfg(2)
    once.merge_from_file(path)
    twice.merge_from_file(path)
    assert twice.dump() == once.dump()
    check_unsupported_keys(twice)
    # a call after the merge keeps the merged values (it does not reset them to the defaults)
    add_qsegformers_config(twice)
    assert twice.dump() == once.dump()
    assert twice.MODEL.DN.NUM_DN == once.MODEL.DN.NUM_DN is not None
