"""QsegCheckpointer: safe loading (.pth weights only, numpy-only .pkl), explicit pickle opt-in, atomic
saving, and missing/unexpected keys grouped by module."""
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from qsegformers.engine import checkpoint as checkpoint_module
from qsegformers.engine.checkpoint import QsegCheckpointer, UnsafeCheckpointError, group_keys_by_module
from qsegformers.utils.checkpoint_files import save_d2_checkpoint


class _Payload:
    """Unpickling this creates a folder: stands for any code a malicious pickle would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 2)))


@pytest.fixture
def records():
    """The module logger's records (the package logger may not propagate to the root after setup())."""
    caught = []
    handler = logging.Handler()
    handler.emit = caught.append
    logger = logging.getLogger(checkpoint_module.__name__)
    logger.addHandler(handler)
    yield caught
    logger.removeHandler(handler)


def test_malicious_pickle_in_pth_is_refused_by_default(tmp_path, records):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": _model().state_dict(), "extra": _Payload(str(marker))}, path)
    with pytest.raises(UnsafeCheckpointError, match="ALLOW_PICKLE_WEIGHTS") as info:
        QsegCheckpointer(_model()).load(str(path))
    assert str(path) in str(info.value)
    assert not marker.exists()

    # The payload is real: with the explicit opt-in it runs, after a warning.
    QsegCheckpointer(_model(), allow_pickle=True).load(str(path))
    assert marker.is_dir()
    assert any("can run arbitrary code" in r.getMessage() for r in records)


def test_numpy_pkl_loads_safely_and_malicious_pkl_is_refused(tmp_path):
    weights = {k: v + 1.0 for k, v in _model().state_dict().items()}
    path = tmp_path / "weights.pkl"
    save_d2_checkpoint(weights, str(path))
    model = _model()
    QsegCheckpointer(model).load(str(path))
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name])

    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as f:
        pickle.dump({"model": {"0.weight": np.zeros(1)}, "__author__": _Payload(str(marker))}, f)
    with pytest.raises(UnsafeCheckpointError, match="posix.mkdir|os.mkdir"):
        QsegCheckpointer(_model()).load(str(evil))
    assert not marker.exists()


def test_trainer_style_checkpoint_loads_with_weights_only(tmp_path):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters())
    model[1](torch.ones(1, 4)).sum().backward()
    optimizer.step()
    QsegCheckpointer(model, str(tmp_path), optimizer=optimizer).save("model_0000001", iteration=1)
    loaded = torch.load(tmp_path / "model_0000001.pth", weights_only=True)
    assert loaded["iteration"] == 1 and loaded["optimizer"]["state"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


def test_a_save_that_dies_midway_leaves_the_previous_files_intact(tmp_path, monkeypatch):
    model = _model()
    checkpointer = QsegCheckpointer(model, str(tmp_path))
    checkpointer.save("model_final")
    before = (tmp_path / "model_final.pth").read_bytes()
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")

    def dying_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt("killed during the save")

    monkeypatch.setattr(checkpoint_module.torch, "save", dying_save)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_final")
    assert (tmp_path / "model_final.pth").read_bytes() == before
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_final.pth"]  # no temp file


def test_missing_and_unexpected_keys_are_grouped_by_module(tmp_path, records):
    weights = {k: v for k, v in _model().state_dict().items() if not k.startswith("1.1.")}
    weights["extra.block.weight"] = torch.zeros(1)
    weights["extra.block.bias"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save({"model": weights}, path)
    QsegCheckpointer(_model()).load(str(path))
    messages = [r.getMessage() for r in records]
    assert "2 parameter(s) missing from the checkpoint, by module: 1.1 (2)" in messages
    assert "2 parameter(s) in the checkpoint but not in the model, by module: extra.block (2)" in messages


def test_group_keys_by_module_counts_in_first_seen_order():
    keys = ["backbone.res2.0.conv1.weight", "head.predictor.weight", "backbone.res2.1.conv1.weight", "bias"]
    assert list(group_keys_by_module(keys).items()) == [("backbone.res2", 2), ("head.predictor", 1), ("bias", 1)]
