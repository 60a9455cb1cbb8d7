"""Evaluator factory: picks detectron2 evaluators from a dataset's ``evaluator_type`` metadata.

* ``sem_seg``: SemSegEvaluator;
* ``coco``: COCOEvaluator (mask AP);
* ``coco_panoptic_seg``, ``ade20k_panoptic_seg``, ``mapillary_vistas_panoptic_seg``:
  COCOPanopticEvaluator if ``PANOPTIC_ON``, SemSegEvaluator if ``SEMANTIC_ON``, COCOEvaluator if
  ``INSTANCE_ON`` and the metadata names an instance ``json_file`` (else a warning);
* ``cityscapes_sem_seg`` / ``cityscapes_instance``: CityscapesSemSegEvaluator / CityscapesInstanceEvaluator;
* ``cityscapes_panoptic_seg``: COCOPanopticEvaluator, CityscapesSemSegEvaluator and
  CityscapesInstanceEvaluator, as switched on by ``PANOPTIC_ON``, ``SEMANTIC_ON``, ``INSTANCE_ON``.

The Cityscapes evaluators are detectron2's, subclassed (``SafeCityscapes*Evaluator``) for two habits
of cityscapesscripts 2.x: its instance evaluation writes ``matches.json`` into the working directory
(it runs in a scratch folder here), and its errors call ``sys.exit`` (turned into a RuntimeError that
names the dataset). Results keep detectron2's keys: ``sem_seg`` has ``IoU`` (not ``mIoU``), ``iIoU``,
``IoU_sup``, ``iIoU_sup``; ``segm`` has ``AP`` and ``AP50``.

The ``*_ON`` switches (``MODEL.MASK_FORMER.TEST``) also decide which outputs the model produces, so an
evaluator is only built for an output that exists. COCO evaluation always uses pycocotools
(``use_fast_impl=False``): detectron2's fast implementation needs compiled ops a pure-Python install
lacks. Mask AP only (``tasks=("segm",)``), as official Mask2Former reports.
"""
import logging
import os
import tempfile
from typing import List, Optional

from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)
from detectron2.utils import comm

from ..evaluation import InstanceSegEvaluator

__all__ = [
    "SafeCityscapesInstanceEvaluator",
    "SafeCityscapesSemSegEvaluator",
    "build_evaluator",
    "get_evaluator_type",
    "SUPPORTED_EVALUATOR_TYPES",
]

logger = logging.getLogger(__name__)

PANOPTIC_TYPES = ("coco_panoptic_seg", "ade20k_panoptic_seg", "mapillary_vistas_panoptic_seg")
CITYSCAPES_TYPES = ("cityscapes_sem_seg", "cityscapes_instance", "cityscapes_panoptic_seg")
SUPPORTED_EVALUATOR_TYPES = ("sem_seg", "coco") + PANOPTIC_TYPES + CITYSCAPES_TYPES
COCO_TASKS = ("segm",)
DEFAULT_OUTPUT_SUBDIR = "inference"


def get_evaluator_type(dataset_name: str) -> str:
    """Return the dataset's ``evaluator_type``, or raise a ValueError if it is missing or unsupported."""
    evaluator_type = getattr(MetadataCatalog.get(dataset_name), "evaluator_type", None)
    if evaluator_type not in SUPPORTED_EVALUATOR_TYPES:
        raise ValueError(
            f"Dataset {dataset_name!r} has evaluator_type {evaluator_type!r} in its metadata, which "
            f"qsegformers cannot evaluate. Supported: {', '.join(SUPPORTED_EVALUATOR_TYPES)}. Set "
            f"MetadataCatalog.get({dataset_name!r}).evaluator_type when registering the dataset."
        )
    return evaluator_type


def _sem_seg_evaluator(dataset_name: str, output_folder: str) -> SemSegEvaluator:
    try:
        return SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)
    except KeyError as err:
        raise ValueError(
            f"SemSegEvaluator needs {err} in every record of dataset {dataset_name!r}: register it with "
            f"its semantic label files, or set MODEL.MASK_FORMER.TEST.SEMANTIC_ON False."
        ) from err


def _coco_evaluator(dataset_name: str, output_folder: str) -> COCOEvaluator:
    # COCOEvaluator that also accepts the non-contiguous thing ids of panoptic datasets (ADE20K).
    return InstanceSegEvaluator(
        dataset_name, tasks=COCO_TASKS, distributed=True, output_dir=output_folder, use_fast_impl=False
    )


class _CityscapesScriptsErrors:
    """Mixin for detectron2's Cityscapes evaluators: cityscapesscripts reports errors with ``sys.exit``."""

    def evaluate(self):
        try:
            return super().evaluate()
        except SystemExit as err:
            self._working_dir.cleanup()
            raise RuntimeError(
                f"cityscapesscripts stopped the evaluation of {self._metadata.name!r} (gt_dir "
                f"{self._metadata.gt_dir}); its 'ERROR:' line above says why."
            ) from err


class SafeCityscapesSemSegEvaluator(_CityscapesScriptsErrors, CityscapesSemSegEvaluator):
    """detectron2's CityscapesSemSegEvaluator (19 trainId classes, ``sem_seg`` output)."""


class SafeCityscapesInstanceEvaluator(_CityscapesScriptsErrors, CityscapesInstanceEvaluator):
    """detectron2's CityscapesInstanceEvaluator, run where its ``matches.json`` cannot litter.

    cityscapesscripts' ``evaluateImgLists`` writes ``matches.json`` into the working directory; the
    evaluation (main process only, after inference) runs in a scratch directory that is then removed.
    """

    def evaluate(self):
        previous = os.getcwd()
        with tempfile.TemporaryDirectory(prefix="cityscapes_matches_") as scratch:
            os.chdir(scratch)
            try:
                return super().evaluate()
            finally:
                os.chdir(previous)


def _check_single_machine(evaluator_type: str) -> None:
    if comm.get_local_size() != comm.get_world_size():
        raise ValueError(
            f"detectron2's Cityscapes evaluators ({evaluator_type}) only work on a single machine; "
            f"this job has {comm.get_world_size()} processes, {comm.get_local_size()} on this machine."
        )


def _panoptic_evaluators(cfg, dataset_name: str, output_folder: str) -> List[DatasetEvaluator]:
    test = cfg.MODEL.MASK_FORMER.TEST
    evaluators: List[DatasetEvaluator] = []
    if test.PANOPTIC_ON:
        evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
    if test.SEMANTIC_ON:
        evaluators.append(_sem_seg_evaluator(dataset_name, output_folder))
    if test.INSTANCE_ON:
        if hasattr(MetadataCatalog.get(dataset_name), "json_file"):
            evaluators.append(_coco_evaluator(dataset_name, output_folder))
        else:
            logger.warning(
                "MODEL.MASK_FORMER.TEST.INSTANCE_ON is set but dataset %r has no instance 'json_file' "
                "in its metadata: instance segmentation is not evaluated.",
                dataset_name,
            )
    return evaluators


def _cityscapes_panoptic_evaluators(cfg, dataset_name: str, output_folder: str) -> List[DatasetEvaluator]:
    test = cfg.MODEL.MASK_FORMER.TEST
    evaluators: List[DatasetEvaluator] = []
    if test.PANOPTIC_ON:
        evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
    if test.SEMANTIC_ON:
        evaluators.append(SafeCityscapesSemSegEvaluator(dataset_name))
    if test.INSTANCE_ON:
        evaluators.append(SafeCityscapesInstanceEvaluator(dataset_name))
    return evaluators


def build_evaluator(cfg, dataset_name: str, output_folder: Optional[str] = None) -> DatasetEvaluator:
    """Build the evaluator(s) for ``dataset_name``; several are combined into ``DatasetEvaluators``.

    Args:
        cfg: the full config (reads ``OUTPUT_DIR`` and ``MODEL.MASK_FORMER.TEST.*_ON``).
        dataset_name: a dataset registered in ``DatasetCatalog`` whose metadata has ``evaluator_type``.
        output_folder: where evaluators write predictions; default ``OUTPUT_DIR/inference``.
    """
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, DEFAULT_OUTPUT_SUBDIR)
    evaluator_type = get_evaluator_type(dataset_name)
    if evaluator_type in CITYSCAPES_TYPES:
        _check_single_machine(evaluator_type)

    if evaluator_type == "sem_seg":
        evaluators = [_sem_seg_evaluator(dataset_name, output_folder)]
    elif evaluator_type == "coco":
        evaluators = [_coco_evaluator(dataset_name, output_folder)]
    elif evaluator_type in PANOPTIC_TYPES:
        evaluators = _panoptic_evaluators(cfg, dataset_name, output_folder)
    elif evaluator_type == "cityscapes_sem_seg":
        evaluators = [SafeCityscapesSemSegEvaluator(dataset_name)]
    elif evaluator_type == "cityscapes_instance":
        evaluators = [SafeCityscapesInstanceEvaluator(dataset_name)]
    else:  # cityscapes_panoptic_seg
        evaluators = _cityscapes_panoptic_evaluators(cfg, dataset_name, output_folder)

    if not evaluators:
        raise ValueError(
            f"Nothing to evaluate on {dataset_name!r} (evaluator_type {evaluator_type!r}): "
            f"MODEL.MASK_FORMER.TEST.PANOPTIC_ON, SEMANTIC_ON and INSTANCE_ON are all off or unusable."
        )
    logger.info(
        "Evaluators for %s: %s", dataset_name, ", ".join(type(e).__name__ for e in evaluators)
    )
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
