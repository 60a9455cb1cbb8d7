"""The non-finite loss guard: training stops at the first NaN/Inf loss term, naming the term and the
iteration, before the weights change, and the last good checkpoint stays the last one."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm

from qsegformers.engine import Trainer
from qsegformers.engine.defaults import get_qsegformers_cfg
from qsegformers.engine.launch import launch
from qsegformers.engine.nan_guard import NonFiniteLossError, check_losses_finite, non_finite_terms

ARCH_NAME = "QsegNanGuardTestArch"
POISON_ITER = 3
CHECKPOINT_PERIOD = 2
NUM_PROCESSES = 2


class QsegNanGuardTestArch(torch.nn.Module):
    """1x1-conv classifier with two loss terms; ``loss_poisoned`` becomes NaN at ``POISON_ITER``."""

    def __init__(self, cfg):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 1)
        self.calls = 0

    def forward(self, batched_inputs):
        images = torch.stack([x["image"].float() / 255.0 for x in batched_inputs])
        targets = torch.stack([x["sem_seg"] for x in batched_inputs])
        logits = self.conv(images)
        loss = F.cross_entropy(logits, targets, ignore_index=255)
        factor = float("nan") if self.calls == POISON_ITER else 0.5
        self.calls += 1
        return {"loss_ok": loss, "loss_poisoned": loss * factor}


if ARCH_NAME not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(QsegNanGuardTestArch)


def _cfg(output_dir):
    cfg = get_qsegformers_cfg()
    cfg.MODEL.META_ARCHITECTURE = ARCH_NAME
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 6
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("qseg_toy_sem_seg_train",), ()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (32,), 64
    cfg.INPUT.CROP.ENABLED = False
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER, cfg.SOLVER.CHECKPOINT_PERIOD = 2, 6, CHECKPOINT_PERIOD
    cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.LR_SCHEDULER_NAME = 0, "WarmupPolyLR"
    cfg.SEED = 0
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.freeze()
    return cfg


def test_training_stops_at_the_poisoned_iteration_and_keeps_the_last_good_checkpoint(tmp_path):
    DatasetCatalog.get("qseg_toy_sem_seg_train")
    trainer = Trainer(_cfg(tmp_path))
    trainer.resume_or_load(resume=False)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    message = str(info.value)
    assert f"iteration {POISON_ITER}" in message
    assert "loss_poisoned = nan" in message and "loss_ok" not in message

    good = f"model_{CHECKPOINT_PERIOD - 1:07d}.pth"
    assert (tmp_path / "last_checkpoint").read_text() == good
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == [good]  # neither model_final nor a later one
    saved = torch.load(tmp_path / good, weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in saved.values())
    # The poisoned gradients exist but were never applied.
    params = list(trainer.model.parameters())
    assert any(not torch.isfinite(p.grad).all() for p in params)
    assert all(torch.isfinite(p).all() for p in params)


def test_non_finite_terms_lists_nan_and_inf_only():
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(float("inf")), "c": torch.tensor(float("nan"))}
    bad = non_finite_terms(losses)
    assert set(bad) == {"b", "c"} and bad["b"] == math.inf and math.isnan(bad["c"])
    check_losses_finite({"a": torch.tensor(2.0)}, 0)  # finite: returns without raising


def _check_on_each_rank(output_dir):
    """Only rank 1 has a NaN; every rank must raise (else rank 0 would wait in the next collective)."""
    value = float("nan") if comm.get_rank() == 1 else 1.0
    try:
        check_losses_finite({"loss_mask": torch.tensor(value)}, 7)
        message = ""
    except NonFiniteLossError as err:
        message = str(err)
    with open(os.path.join(output_dir, f"rank{comm.get_rank()}.txt"), "w") as f:
        f.write(message)


def test_every_rank_stops_when_one_rank_has_a_nan(tmp_path):
    launch(_check_on_each_rank, NUM_PROCESSES, args=(str(tmp_path),), device="cpu")
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(NUM_PROCESSES)]
    for message in messages:
        assert "iteration 7" in message and "rank 1: loss_mask = nan" in message and "rank 0" not in message
