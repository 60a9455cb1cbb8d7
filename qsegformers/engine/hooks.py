"""Training hooks that fix silent checkpointing gaps of detectron2 v0.6.

detectron2 v0.6's ``hooks.LRScheduler`` only saves and restores schedulers deriving from torch's legacy
``_LRScheduler``. Since torch 2.0 the built-in schedulers (``PolynomialLR``, ``OneCycleLR``, ...)
derive from ``LRScheduler`` instead, so their state silently restarts on resume (notes S2).

For exact resume (issue 11) this module also has:

* :class:`IterationSeed`: seeds python, numpy and torch before every step from (seed, iteration, rank),
  so the model's own randomness (point sampling, dropout, noise) continues exactly after a resume
  without checkpointing generator states;
* :class:`CheckpointAlignedWriter`: detectron2's ``PeriodicWriter`` that also writes at every
  checkpoint iteration; the trainer runs it before the checkpointer, so every checkpoint on disk has
  all its metrics in ``metrics.json`` before it exists;
* :func:`truncate_metrics_log`: on resume, drops the ``metrics.json`` records of iterations after the
  checkpoint (written before a kill) and a line cut by the kill, so the log has no duplicates.
"""
import json
import logging
import os
import random
from typing import List

import numpy as np
import torch
from detectron2.engine import hooks
from detectron2.utils import comm

__all__ = [
    "LRScheduler",
    "replace_lr_scheduler_hook",
    "IterationSeed",
    "CheckpointAlignedWriter",
    "truncate_metrics_log",
    "iteration_seed",
]

logger = logging.getLogger(__name__)


def _is_torch_scheduler(scheduler) -> bool:
    return isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)


class LRScheduler(hooks.LRScheduler):
    """detectron2's ``LRScheduler`` hook that checkpoints any torch ``LRScheduler``.

    The class keeps the name ``LRScheduler``: the trainer stores hook states under the hook's class
    name, so checkpoints written by plain detectron2 trainers restore into this hook and back.
    """

    def state_dict(self):
        if _is_torch_scheduler(self.scheduler):
            return self.scheduler.state_dict()
        return {}

    def load_state_dict(self, state_dict):
        if _is_torch_scheduler(self.scheduler):
            logger.info("Loading LR scheduler state (last iteration %s).", state_dict.get("last_epoch"))
            self.scheduler.load_state_dict(state_dict)


def replace_lr_scheduler_hook(hook_list):
    """Return ``hook_list`` with detectron2's own ``LRScheduler`` hook swapped for :class:`LRScheduler`."""
    return [
        LRScheduler(optimizer=h._optimizer, scheduler=h._scheduler) if type(h) is hooks.LRScheduler else h
        for h in hook_list
    ]


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    """A 32-bit seed mixed from the run seed, the iteration and the rank."""
    return int(np.random.SeedSequence([seed % 2**63, iteration, rank]).generate_state(1, dtype=np.uint32)[0])


class IterationSeed(hooks.HookBase):
    """Seed python, numpy and torch (all devices) before each step from ``(trainer.seed, iter, rank)``."""

    def before_step(self):
        seed = iteration_seed(self.trainer.seed, self.trainer.iter, comm.get_rank())
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


class CheckpointAlignedWriter(hooks.PeriodicWriter):
    """``PeriodicWriter`` that also writes at the iterations where a checkpoint is saved."""

    def __init__(self, writers, period: int, checkpoint_period: int):
        super().__init__(writers, period=period)
        self._checkpoint_period = checkpoint_period

    def after_step(self):
        next_iter = self.trainer.iter + 1
        periodic = next_iter % self._period == 0 or next_iter == self.trainer.max_iter  # written below anyway
        if self._checkpoint_period > 0 and next_iter % self._checkpoint_period == 0 and not periodic:
            for writer in self._writers:
                writer.write()
        super().after_step()


def truncate_metrics_log(path: str, start_iter: int) -> int:
    """Keep the JSON records of ``path`` with ``iteration < start_iter``; returns how many were dropped.

    A line that is not valid JSON (cut by a kill during the write) is dropped too. The file is cut in
    place, not replaced: the trainer's ``JSONWriter`` already holds it open in append mode and keeps
    appending to it. A missing file is left missing.
    """
    if not os.path.exists(path):
        return 0
    kept: List[str] = []
    dropped = 0
    with open(path, "r+") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if record.get("iteration", -1) < start_iter:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
        if dropped:
            f.seek(0)
            f.writelines(kept)
            f.truncate()
    if dropped:
        logger.info("Resuming at iteration %d: dropped %d record(s) of later iterations from %s.",
                    start_iter, dropped, path)
    return dropped
