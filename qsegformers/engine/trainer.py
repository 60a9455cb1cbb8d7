"""The qsegformers trainer: detectron2's ``DefaultTrainer`` with Mask2Former's solver and data.

On top of the builders, it fixes two silent resume bugs of detectron2 v0.6:

* S1: the optimizer state (momentum, Adam moments) is not checkpointed; here it is registered in the
  checkpointer, so ``resume_or_load(resume=True)`` restores it.
* S2: torch-native LR schedulers are not checkpointed; the LR-scheduler hook is replaced by
  :class:`qsegformers.engine.hooks.LRScheduler`, which saves any torch ``LRScheduler``.
"""
import logging
import os
from collections import OrderedDict

from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, hooks
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

from .defaults import disable_amp_without_cuda
from .evaluators import build_evaluator, get_evaluator_type
from .hooks import replace_lr_scheduler_hook
from .lr_scheduler import build_lr_scheduler
from .optimizer import build_optimizer
from .tta import MaskFormerWithTTA

__all__ = ["Trainer"]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
OPTIMIZER_CHECKPOINT_KEY = "optimizer"
TTA_OUTPUT_SUBDIR = "inference_TTA"


class Trainer(DefaultTrainer):
    """Train and evaluate a qsegformers model from a config (see ``train_net.py``)."""

    def __init__(self, cfg):
        cfg = disable_amp_without_cuda(cfg)
        # Fail before training rather than at the final evaluation if a test set cannot be evaluated.
        for dataset_name in cfg.DATASETS.TEST:
            get_evaluator_type(dataset_name)
        super().__init__(cfg)
        # S1: mutate the existing checkpointer, PeriodicCheckpointer already holds it.
        self.checkpointer.checkpointables[OPTIMIZER_CHECKPOINT_KEY] = self.optimizer

    def build_hooks(self):
        """detectron2's default hooks, with an LR-scheduler hook that checkpoints torch schedulers,
        plus a final evaluation with test-time augmentation when ``TEST.AUG.ENABLED``."""
        hook_list = replace_lr_scheduler_hook(super().build_hooks())
        if self.cfg.TEST.AUG.ENABLED:
            hook_list.append(hooks.EvalHook(0, lambda: self.test_with_TTA(self.cfg, self.model)))
        return hook_list

    def build_writers(self):
        """Console metrics, ``OUTPUT_DIR/metrics.json`` and TensorBoard event files."""
        output_dir = self.cfg.OUTPUT_DIR
        return [
            CommonMetricPrinter(self.max_iter),
            JSONWriter(os.path.join(output_dir, METRICS_FILE)),
            TensorboardXWriter(output_dir),
        ]

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_mapper(cls, cfg):
        """The training mapper selected by ``INPUT.DATASET_MAPPER_NAME``."""
        # Imported here so the engine does not depend on the data package at import time.
        from qsegformers.data.mappers.build import build_dataset_mapper

        return build_dataset_mapper(cfg, True)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=cls.build_train_mapper(cfg))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """detectron2's test loader with its default ``DatasetMapper`` (resize only)."""
        return build_detection_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate ``model`` on every ``DATASETS.TEST`` set, on whatever device the model is on."""
        if not cfg.DATASETS.TEST:
            logger.warning("DATASETS.TEST is empty: there is nothing to evaluate.")
            return {}
        return super().test(cfg, model, evaluators)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluate with multi-scale + flip test-time augmentation (``TEST.AUG.*``); keys get "_TTA"."""
        logger.info("Running inference with test-time augmentation ...")
        evaluators = [
            cls.build_evaluator(cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, TTA_OUTPUT_SUBDIR))
            for name in cfg.DATASETS.TEST
        ]
        results = cls.test(cfg, MaskFormerWithTTA(cfg, model), evaluators)
        return OrderedDict((k + "_TTA", v) for k, v in results.items())
