"""Stop training at the first non-finite loss, on every rank, before the weights are updated.

detectron2 v0.6 checks the losses only on the main process (other ranks go on and wait for it in the
next collective until the time-out) and reports the whole loss dict. Here every rank checks its own
loss terms after the backward pass and before ``optimizer.step()``; the ranks agree through one
all-reduce of a flag, and all raise :class:`NonFiniteLossError`, naming the iteration, the terms and
the ranks. Since the exception comes before the optimizer step and before the checkpointer runs, the
weights are never updated with the poisoned gradients, and ``model_final.pth`` / ``last_checkpoint``
keep pointing to the last good checkpoint.
"""
import logging
import math
from typing import Dict, List

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.utils import comm

__all__ = ["NonFiniteLossError", "non_finite_terms", "check_losses_finite", "guard_trainer"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite (the message names the iteration and the terms)."""


def non_finite_terms(loss_dict: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """The loss terms (name -> value) whose value is NaN or +-inf."""
    values = {name: float(value.detach().sum()) for name, value in loss_dict.items()}
    return {name: value for name, value in values.items() if not math.isfinite(value)}


def check_losses_finite(loss_dict: Dict[str, torch.Tensor], iteration: int) -> None:
    """Raise :class:`NonFiniteLossError` on every rank if any rank has a non-finite loss term.

    Must be called by all ranks at the same point (it runs a collective when there are several).
    """
    bad = non_finite_terms(loss_dict)
    if comm.get_world_size() > 1:
        device = next(iter(loss_dict.values())).device if loss_dict else torch.device("cpu")
        flag = torch.tensor([float(bool(bad))], device=device)
        torch.distributed.all_reduce(flag)
        if flag.item() == 0:
            return
        reports: List[Dict[str, float]] = comm.all_gather(bad)
    elif not bad:
        return
    else:
        reports = [bad]
    details = "; ".join(
        f"rank {rank}: " + ", ".join(f"{name} = {value}" for name, value in sorted(terms.items()))
        for rank, terms in enumerate(reports) if terms
    )
    raise NonFiniteLossError(
        f"Non-finite loss at iteration {iteration} ({details}). Training stopped before the optimizer "
        f"step: these weights were not updated and not saved; the last good checkpoint is the one named "
        f"in OUTPUT_DIR/last_checkpoint. Lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS or check the "
        f"data of this iteration, then resume."
    )


class _LossGuardMixin:
    def _write_metrics(self, loss_dict, data_time, prefix: str = "") -> None:
        check_losses_finite(loss_dict, self.iter)
        super()._write_metrics(loss_dict, data_time, prefix)


class GuardedSimpleTrainer(_LossGuardMixin, SimpleTrainer):
    """detectron2's ``SimpleTrainer`` that stops at a non-finite loss on every rank."""


class GuardedAMPTrainer(_LossGuardMixin, AMPTrainer):
    """detectron2's ``AMPTrainer`` that stops at a non-finite loss on every rank."""


def guard_trainer(trainer: SimpleTrainer) -> SimpleTrainer:
    """A guarded trainer with the same model, data loader and optimizer (and AMP grad scaler)."""
    if isinstance(trainer, _LossGuardMixin):
        return trainer
    if isinstance(trainer, AMPTrainer):
        return GuardedAMPTrainer(trainer.model, trainer.data_loader, trainer.optimizer,
                                 grad_scaler=trainer.grad_scaler)
    if type(trainer) is SimpleTrainer:
        return GuardedSimpleTrainer(trainer.model, trainer.data_loader, trainer.optimizer)
    raise TypeError(f"Cannot add the non-finite loss guard to a {type(trainer).__name__}.")
