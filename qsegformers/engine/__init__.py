"""Training engine: optimizer, poly LR schedule, evaluator factory, trainer, launcher, set-up, safe
checkpoints, config validation and the non-finite loss guard."""
from .checkpoint import QsegCheckpointer, UnsafeCheckpointError
from .defaults import setup
from .evaluators import build_evaluator
from .launch import launch
from .lr_scheduler import build_lr_scheduler
from .nan_guard import NonFiniteLossError
from .optimizer import build_optimizer
from .trainer import Trainer
from .validation import ConfigValidationError, validate_config

__all__ = [
    "ConfigValidationError",
    "NonFiniteLossError",
    "QsegCheckpointer",
    "Trainer",
    "UnsafeCheckpointError",
    "build_evaluator",
    "build_lr_scheduler",
    "build_optimizer",
    "launch",
    "setup",
    "validate_config",
]
