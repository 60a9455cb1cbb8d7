"""Training engine: optimizer, poly LR schedule, evaluator factory, trainer, launcher and set-up."""
from .defaults import setup
from .evaluators import build_evaluator
from .launch import launch
from .lr_scheduler import build_lr_scheduler
from .optimizer import build_optimizer
from .trainer import Trainer

__all__ = ["Trainer", "build_evaluator", "build_lr_scheduler", "build_optimizer", "launch", "setup"]
