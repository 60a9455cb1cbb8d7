"""Training hooks that fix silent checkpointing gaps of detectron2 v0.6.

detectron2 v0.6's ``hooks.LRScheduler`` only saves and restores schedulers deriving from torch's legacy
``_LRScheduler``. Since torch 2.0 the built-in schedulers (``PolynomialLR``, ``OneCycleLR``, ...)
derive from ``LRScheduler`` instead, so their state silently restarts on resume (notes S2).
"""
import logging

import torch
from detectron2.engine import hooks

__all__ = ["LRScheduler", "replace_lr_scheduler_hook"]

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
