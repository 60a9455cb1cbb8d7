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

from detectron2.engine import AMPTrainer, SimpleTrainer

from ..utils.loss_checks import NonFiniteLossError, check_losses_finite, non_finite_terms

__all__ = ["NonFiniteLossError", "non_finite_terms", "check_losses_finite", "guard_trainer"]

logger = logging.getLogger(__name__)


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
