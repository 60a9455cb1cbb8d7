"""Learning-rate schedules: Mask2Former's ``WarmupPolyLR`` plus detectron2's own schedules.

``WarmupPolyLR`` reproduces detectron2 DeepLab's scheduler of that name (which official Mask2Former
configs select), built from fvcore parameter schedulers and driven by detectron2's ``LRMultiplier``.
``LRMultiplier`` subclasses torch's ``_LRScheduler``, so detectron2's ``LRScheduler`` hook saves and
restores it with the checkpoint. At iteration ``it`` of ``MAX_ITER``, each group's LR is its base LR
times

    warmup(it) * max((1 - it / MAX_ITER) ** POLY_LR_POWER, POLY_LR_CONSTANT_ENDING)

where the constant ending only applies when ``POLY_LR_CONSTANT_ENDING > 0``, and ``warmup(it)`` is
1 after ``WARMUP_ITERS``; before, it is ``WARMUP_FACTOR`` ("constant") or rises linearly from
``WARMUP_FACTOR`` to 1 ("linear").
"""
import logging

import torch
from detectron2.solver import build_lr_scheduler as d2_build_lr_scheduler
from detectron2.solver.lr_scheduler import LRMultiplier
from fvcore.common.param_scheduler import ParamScheduler

__all__ = ["build_lr_scheduler", "PolyParamScheduler", "WarmupFactorParamScheduler"]

logger = logging.getLogger(__name__)

POLY_SCHEDULER_NAME = "WarmupPolyLR"
DETECTRON2_SCHEDULER_NAMES = ("WarmupMultiStepLR", "WarmupCosineLR")  # those of detectron2 v0.6
WARMUP_METHODS = ("linear", "constant")


class PolyParamScheduler(ParamScheduler):
    """``(1 - where) ** power``, held at ``constant_ending`` once it would fall below it.

    ``where`` is the training progress in [0, 1]; ``constant_ending <= 0`` disables the floor.
    """

    def __init__(self, power: float, constant_ending: float = 0.0):
        self._power = power
        self._constant_ending = constant_ending

    def __call__(self, where: float) -> float:
        value = max(1.0 - where, 0.0) ** self._power
        if self._constant_ending > 0 and value < self._constant_ending:
            return self._constant_ending
        return value


class WarmupFactorParamScheduler(ParamScheduler):
    """Multiply ``scheduler`` by a warm-up factor during the first ``warmup_length`` of training.

    Unlike detectron2's ``WarmupParamScheduler`` (which interpolates towards the wrapped schedule's
    value at the end of the warm-up), the factor multiplies the wrapped schedule, as DeepLab's
    ``WarmupPolyLR`` does, so official Mask2Former schedules are reproduced exactly.

    Args:
        scheduler: the schedule to warm up.
        warmup_factor: the factor at ``where == 0``.
        warmup_length: warm-up length as a fraction of training, in [0, 1].
        warmup_method: "linear" (factor rises linearly to 1) or "constant" (factor stays fixed).
    """

    def __init__(
        self,
        scheduler: ParamScheduler,
        warmup_factor: float,
        warmup_length: float,
        warmup_method: str = "linear",
    ):
        if warmup_method not in WARMUP_METHODS:
            raise ValueError(
                f"SOLVER.WARMUP_METHOD = {warmup_method!r} is not supported; choose one of "
                f"{', '.join(repr(m) for m in WARMUP_METHODS)}."
            )
        self._scheduler = scheduler
        self._warmup_factor = warmup_factor
        self._warmup_length = warmup_length
        self._warmup_method = warmup_method

    def _factor(self, where: float) -> float:
        if where >= self._warmup_length:
            return 1.0
        if self._warmup_method == "constant":
            return self._warmup_factor
        alpha = where / self._warmup_length
        return self._warmup_factor * (1.0 - alpha) + alpha

    def __call__(self, where: float) -> float:
        return self._factor(where) * self._scheduler(where)


def _check_solver_keys(cfg) -> None:
    if cfg.SOLVER.MAX_ITER <= 0:
        raise ValueError(f"SOLVER.MAX_ITER = {cfg.SOLVER.MAX_ITER} must be a positive iteration count.")
    if cfg.SOLVER.WARMUP_METHOD not in WARMUP_METHODS:
        raise ValueError(
            f"SOLVER.WARMUP_METHOD = {cfg.SOLVER.WARMUP_METHOD!r} is not supported; choose one of "
            f"{', '.join(repr(m) for m in WARMUP_METHODS)}."
        )


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler._LRScheduler:
    """Build the LR scheduler named by ``SOLVER.LR_SCHEDULER_NAME`` for ``optimizer``.

    "WarmupPolyLR" is built here; any other name is passed on to detectron2's
    ``build_lr_scheduler`` (v0.6: "WarmupMultiStepLR", "WarmupCosineLR").
    """
    _check_solver_keys(cfg)
    name = cfg.SOLVER.LR_SCHEDULER_NAME
    max_iter = cfg.SOLVER.MAX_ITER
    if name != POLY_SCHEDULER_NAME:
        try:
            return d2_build_lr_scheduler(cfg, optimizer)
        except ValueError as err:
            raise ValueError(
                f"SOLVER.LR_SCHEDULER_NAME = {name!r} could not be built ({err}). Supported: "
                f"{POLY_SCHEDULER_NAME!r} and detectron2's schedules "
                f"({', '.join(repr(n) for n in DETECTRON2_SCHEDULER_NAMES)} in v0.6)."
            ) from err

    multiplier = WarmupFactorParamScheduler(
        PolyParamScheduler(cfg.SOLVER.POLY_LR_POWER, cfg.SOLVER.POLY_LR_CONSTANT_ENDING),
        warmup_factor=cfg.SOLVER.WARMUP_FACTOR,
        warmup_length=min(cfg.SOLVER.WARMUP_ITERS / max_iter, 1.0),
        warmup_method=cfg.SOLVER.WARMUP_METHOD,
    )
    logger.info(
        "%s: power %s, constant ending %s, %s warm-up of %d iterations from factor %s, %d iterations.",
        POLY_SCHEDULER_NAME,
        cfg.SOLVER.POLY_LR_POWER,
        cfg.SOLVER.POLY_LR_CONSTANT_ENDING,
        cfg.SOLVER.WARMUP_METHOD,
        cfg.SOLVER.WARMUP_ITERS,
        cfg.SOLVER.WARMUP_FACTOR,
        max_iter,
    )
    return LRMultiplier(optimizer, multiplier=multiplier, max_iter=max_iter)
