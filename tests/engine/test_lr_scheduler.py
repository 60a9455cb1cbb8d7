"""Tests of qsegformers.engine.lr_scheduler: WarmupPolyLR against its closed form, and resume."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.solver.lr_scheduler import LRMultiplier

from qsegformers.config import add_qsegformers_config
from qsegformers.engine.lr_scheduler import build_lr_scheduler

BASE_LRS = (0.1, 0.01)  # two parameter groups, e.g. heads and backbone
MAX_ITER = 40
POWER = 0.9
WARMUP_FACTOR = 0.01


def _cfg(**solver):
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR"
    cfg.SOLVER.MAX_ITER = MAX_ITER
    cfg.SOLVER.POLY_LR_POWER = POWER
    cfg.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.WARMUP_FACTOR = 1.0
    for key, value in solver.items():
        setattr(cfg.SOLVER, key, value)
    return cfg


def _optimizer():
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in BASE_LRS]
    return torch.optim.SGD(groups, lr=BASE_LRS[0])


def _expected_factor(it, cfg):
    """DeepLab's WarmupPolyLR (used by official Mask2Former), written out."""
    s = cfg.SOLVER
    warmup = 1.0
    if it < s.WARMUP_ITERS:
        if s.WARMUP_METHOD == "constant":
            warmup = s.WARMUP_FACTOR
        else:
            alpha = it / s.WARMUP_ITERS
            warmup = s.WARMUP_FACTOR * (1 - alpha) + alpha
    poly = (1 - it / s.MAX_ITER) ** s.POLY_LR_POWER
    if s.POLY_LR_CONSTANT_ENDING > 0 and warmup == 1.0 and poly < s.POLY_LR_CONSTANT_ENDING:
        return s.POLY_LR_CONSTANT_ENDING
    return warmup * poly


def _lr_sequence(optimizer, scheduler, iterations):
    """LRs in effect at each iteration, stepping like detectron2's trainer (optimizer, then LR)."""
    lrs = []
    for _ in range(iterations):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return lrs


def _check_against_closed_form(cfg):
    optimizer = _optimizer()
    scheduler = build_lr_scheduler(cfg, optimizer)
    assert isinstance(scheduler, LRMultiplier)
    for it, lrs in enumerate(_lr_sequence(optimizer, scheduler, MAX_ITER)):
        factor = _expected_factor(it, cfg)
        assert lrs == pytest.approx([base * factor for base in BASE_LRS], rel=1e-9), it


def test_poly_matches_closed_form():
    _check_against_closed_form(_cfg())


def test_constant_ending():
    ending = 0.3
    cfg = _cfg(POLY_LR_CONSTANT_ENDING=ending)
    _check_against_closed_form(cfg)
    optimizer = _optimizer()
    lrs = _lr_sequence(optimizer, build_lr_scheduler(cfg, optimizer), MAX_ITER)
    first_floor = next(it for it in range(MAX_ITER) if (1 - it / MAX_ITER) ** POWER < ending)
    assert 0 < first_floor < MAX_ITER - 1
    assert all(lr == pytest.approx([b * ending for b in BASE_LRS]) for lr in lrs[first_floor:])


@pytest.mark.parametrize("method", ["linear", "constant"])
def test_warmup(method):
    cfg = _cfg(WARMUP_ITERS=5, WARMUP_FACTOR=WARMUP_FACTOR, WARMUP_METHOD=method)
    _check_against_closed_form(cfg)
    optimizer = _optimizer()
    build_lr_scheduler(cfg, optimizer)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(BASE_LRS[0] * WARMUP_FACTOR)


def test_state_dict_round_trip_resumes_the_same_sequence():
    cfg = _cfg(WARMUP_ITERS=3, WARMUP_FACTOR=0.1, POLY_LR_CONSTANT_ENDING=0.2)
    optimizer = _optimizer()
    reference = _lr_sequence(optimizer, build_lr_scheduler(cfg, optimizer), MAX_ITER)

    stop = MAX_ITER // 3
    optimizer = _optimizer()
    scheduler = build_lr_scheduler(cfg, optimizer)
    first_part = _lr_sequence(optimizer, scheduler, stop)
    saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}

    resumed_optimizer = _optimizer()
    resumed = build_lr_scheduler(cfg, resumed_optimizer)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["scheduler"])
    assert resumed.last_epoch == stop
    second_part = _lr_sequence(resumed_optimizer, resumed, MAX_ITER - stop)
    resumed_lrs = [lr for lrs in first_part + second_part for lr in lrs]
    assert resumed_lrs == pytest.approx([lr for lrs in reference for lr in lrs], rel=1e-12)


def test_detectron2_schedules_are_delegated():
    optimizer = _optimizer()
    scheduler = build_lr_scheduler(_cfg(LR_SCHEDULER_NAME="WarmupMultiStepLR", STEPS=(10,)), optimizer)
    lrs = _lr_sequence(optimizer, scheduler, MAX_ITER)
    assert lrs[10][0] == pytest.approx(BASE_LRS[0] * get_cfg().SOLVER.GAMMA)


@pytest.mark.parametrize(
    "solver, key",
    [
        ({"LR_SCHEDULER_NAME": "StepLR"}, "SOLVER.LR_SCHEDULER_NAME"),
        ({"WARMUP_METHOD": "cosine"}, "SOLVER.WARMUP_METHOD"),
        ({"MAX_ITER": 0}, "SOLVER.MAX_ITER"),
    ],
)
def test_bad_keys_are_named(solver, key):
    with pytest.raises(ValueError, match=key):
        build_lr_scheduler(_cfg(**solver), _optimizer())
