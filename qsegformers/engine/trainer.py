"""The qsegformers trainer: detectron2's ``DefaultTrainer`` with Mask2Former's solver and data.

On top of the builders, it fixes two silent resume bugs of detectron2 v0.6:

* S1: the optimizer state (momentum, Adam moments) is not checkpointed; here it is registered in the
  checkpointer, so ``resume_or_load(resume=True)`` restores it.
* S2: torch-native LR schedulers are not checkpointed; the LR-scheduler hook is replaced by
  :class:`qsegformers.engine.hooks.LRScheduler`, which saves any torch ``LRScheduler``.

and makes training reliable (issue 11):

* exact resume: the training data stream continues at the resumed iteration with the same
  augmentations (:mod:`qsegformers.data.train_loader`), the model's randomness is seeded per
  iteration (:class:`~qsegformers.engine.hooks.IterationSeed`), the run's seed is checkpointed, and
  ``metrics.json`` is cut back to the checkpoint's iteration (no duplicates), while every checkpoint
  is written after the metrics of its iterations (no gaps);
* checkpoints are written atomically and loaded safely (:class:`~qsegformers.engine.checkpoint.QsegCheckpointer`);
* a non-finite loss stops every rank before the weights change (:mod:`qsegformers.engine.nan_guard`);
* the config is validated before anything is built (:mod:`qsegformers.engine.validation`).
"""
import logging
import os
import weakref
from collections import OrderedDict

from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, hooks
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

from ..data.mappers.build import build_dataset_mapper
from ..data.mappers.robust import DropBadSamples
from ..data.mappers.test_time import SafeTestDatasetMapper
from ..data.train_loader import build_resumable_train_loader, is_resumable
from .checkpoint import QsegCheckpointer
from .defaults import disable_amp_without_cuda
from .evaluators import build_evaluator, get_evaluator_type
from .hooks import CheckpointAlignedWriter, IterationSeed, replace_lr_scheduler_hook, truncate_metrics_log
from .lr_scheduler import build_lr_scheduler
from .nan_guard import guard_trainer
from .optimizer import build_optimizer
from .tta import MaskFormerWithTTA
from .validation import validate_config

__all__ = ["Trainer"]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
OPTIMIZER_CHECKPOINT_KEY = "optimizer"
TTA_OUTPUT_SUBDIR = "inference_TTA"
SEED_STATE_KEY = "seed"


def training_seed(cfg) -> int:
    """``cfg.SEED``, or with SEED < 0 a random seed shared by all ranks (then saved in checkpoints)."""
    return cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()


class Trainer(DefaultTrainer):
    """Train and evaluate a qsegformers model from a config (see ``train_net.py``)."""

    def __init__(self, cfg):
        cfg = disable_amp_without_cuda(cfg)
        validate_config(cfg)
        # Fail before training rather than at the final evaluation if a test set cannot be evaluated.
        for dataset_name in cfg.DATASETS.TEST:
            get_evaluator_type(dataset_name)
        super().__init__(cfg)
        self._trainer = guard_trainer(self._trainer)
        loader = self._trainer.data_loader
        self.seed = loader.seed if hasattr(loader, "start_iter") else training_seed(cfg)

    def build_hooks(self):
        """detectron2's default hooks, reordered and extended for exact resume:

        ``IterationSeed``, timer, LR scheduler (checkpoints torch schedulers), PreciseBN, evaluation,
        test-time-augmentation evaluation (``TEST.AUG.ENABLED``), a writer that also writes at every
        checkpoint iteration, and last the checkpointer, so a checkpoint never exists before the
        metrics and evaluation results of its iteration are written.
        """
        # The checkpointer saves atomically, loads safely, and holds the optimizer (S1).
        self.checkpointer = QsegCheckpointer.from_config(
            self.cfg, self._trainer.model, trainer=weakref.proxy(self),
            **{OPTIMIZER_CHECKPOINT_KEY: self._trainer.optimizer},
        )
        hook_list = replace_lr_scheduler_hook(super().build_hooks())
        checkpointers = [h for h in hook_list if isinstance(h, hooks.PeriodicCheckpointer)]
        for h in checkpointers:
            h.checkpointer = self.checkpointer
        writers = [h for h in hook_list if isinstance(h, hooks.PeriodicWriter)]
        hook_list = [h for h in hook_list if not isinstance(h, (hooks.PeriodicCheckpointer, hooks.PeriodicWriter))]
        if self.cfg.TEST.AUG.ENABLED:
            hook_list.append(hooks.EvalHook(0, lambda: self.test_with_TTA(self.cfg, self.model)))
        for h in writers:
            hook_list.append(CheckpointAlignedWriter(h._writers, h._period, self.cfg.SOLVER.CHECKPOINT_PERIOD))
        return [IterationSeed()] + hook_list + checkpointers

    def resume_or_load(self, resume: bool = True):
        """detectron2's resume/load; then the data stream continues at ``start_iter`` and, when
        resuming, ``metrics.json`` loses the records of iterations after the checkpoint."""
        super().resume_or_load(resume=resume)
        loader = self._trainer.data_loader
        if hasattr(loader, "start_iter"):
            loader.start_iter, loader.seed = self.start_iter, self.seed
        if resume and comm.is_main_process():
            truncate_metrics_log(os.path.join(self.cfg.OUTPUT_DIR, METRICS_FILE), self.start_iter)

    def state_dict(self):
        state = super().state_dict()
        state[SEED_STATE_KEY] = self.seed
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if SEED_STATE_KEY in state_dict:
            self.seed = int(state_dict[SEED_STATE_KEY])

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
        """The training mapper selected by ``INPUT.DATASET_MAPPER_NAME``; a sample it cannot use is
        dropped with one warning (:class:`qsegformers.data.mappers.robust.DropBadSamples`)."""
        return DropBadSamples(build_dataset_mapper(cfg, True))

    @classmethod
    def build_train_loader(cls, cfg):
        """The resumable loader (``TrainingSampler``), else detectron2's loader (resume restarts it)."""
        mapper = cls.build_train_mapper(cfg)
        if is_resumable(cfg):
            return build_resumable_train_loader(cfg, mapper, training_seed(cfg))
        logger.warning(
            "DATALOADER.SAMPLER_TRAIN = %r has no resumable implementation: a resumed run restarts its "
            "data stream from the beginning.", cfg.DATALOADER.SAMPLER_TRAIN,
        )
        return build_detection_train_loader(cfg, mapper=mapper)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """detectron2's test loader with ``SafeTestDatasetMapper`` (detectron2's test-time resize; images
        read like the training mappers: EXIF, grayscale, palette, RGBA, 16-bit)."""
        return build_detection_test_loader(cfg, dataset_name, mapper=SafeTestDatasetMapper(cfg, False))

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
