"""FixedMatcher: query k <-> class k, with clear errors for targets it cannot assign."""
import pytest
import torch
from detectron2.config import get_cfg

from qsegformers import add_qsegformers_config
from qsegformers.matching.build import build_matcher
from qsegformers.matching.fixed import FixedMatcher

K = 6


def outputs(batch=1):
    return {"pred_masks": torch.zeros(batch, K, 4, 4)}


def targets(*label_lists):
    return [{"labels": torch.tensor(labels, dtype=torch.int64)} for labels in label_lists]


def test_targets_in_class_order_give_the_identity():
    (pred_idx, tgt_idx), = FixedMatcher()(outputs(), targets(list(range(K))))
    assert torch.equal(pred_idx, torch.arange(K)) and torch.equal(tgt_idx, torch.arange(K))


def test_each_present_class_goes_to_its_own_query():
    (pred_a, tgt_a), (pred_b, tgt_b), (pred_c, tgt_c) = FixedMatcher()(outputs(3), targets([3, 0, 5], [2], []))
    assert pred_a.tolist() == [0, 3, 5] and tgt_a.tolist() == [1, 0, 2]
    assert pred_b.tolist() == [2] and tgt_b.tolist() == [0]
    assert pred_c.numel() == 0 and tgt_c.numel() == 0
    assert pred_a.dtype == tgt_a.dtype == torch.int64


def test_clear_errors_for_unassignable_targets():
    with pytest.raises(ValueError, match="6 queries"):
        FixedMatcher()(outputs(), targets([1, 6]))
    with pytest.raises(ValueError, match="more than once"):
        FixedMatcher()(outputs(), targets([2, 4, 2]))
    with pytest.raises(ValueError, match="targets"):
        FixedMatcher()(outputs(2), targets([1]))


def test_built_by_registry_name():
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    assert isinstance(build_matcher(cfg, "FixedMatcher"), FixedMatcher)
