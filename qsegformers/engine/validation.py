"""Start-up validation of a config: every problem found, reported in one ``ConfigValidationError``.

Checked before anything is built (``setup()``, ``Trainer`` and ``train_net.py --eval-only``):

* registry names: the meta-architecture, the training mapper and, for qsegformers meta-architectures,
  backbone, head, pixel decoder, transformer decoder, matcher and criterion;
* the compatibility keys of official configs (:func:`qsegformers.config.check_unsupported_keys`);
* ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` against the class list of every train/test dataset:
  ``thing_classes`` for instance data (evaluator "coco"/"cityscapes_instance" or the instance mapper),
  else ``stuff_classes`` (semantic, and panoptic, whose ``stuff_classes`` list every class); -1 (take
  it from the dataset) must have been resolved by ``setup()`` (:mod:`qsegformers.data.datasets.custom`);
* panoptic test sets evaluated for PQ have a thing and a stuff class (panopticapi's PQ_th / PQ_st would
  divide by zero: rejected here rather than crashing after training), and a ``DATASETS.CUSTOM``
  panoptic test set evaluated for mIoU has its ``SEM_SEG_ROOT``;
* decoder / pixel decoder: a decoder that reads ``L`` multi-scale levels (its declared
  ``QueryDecoder.num_feature_levels``) needs at least ``L`` features in ``MODEL.SEM_SEG_HEAD.IN_FEATURES``;
* decoder / matcher: ``FixedMatcher`` assigns query k to class k, so a decoder built for another
  matcher (whose query count is ``NUM_OBJECT_QUERIES``) needs ``NUM_OBJECT_QUERIES == NUM_CLASSES``;
  decoders that declare ``matcher_name = "FixedMatcher"`` make one query per class themselves.
"""
import logging
from typing import List, Optional, Tuple

from detectron2.data import MetadataCatalog
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY

from ..config import check_unsupported_keys
from ..data.datasets.custom import CONFIG_KEY_FIELD as CUSTOM_CONFIG_KEY_FIELD
from ..data.datasets.custom_config import NUM_CLASSES_FROM_DATASET
from ..registries import (
    CRITERION_REGISTRY,
    DATASET_MAPPER_REGISTRY,
    MATCHER_REGISTRY,
    PIXEL_DECODER_REGISTRY,
    TRANSFORMER_DECODER_REGISTRY,
)
from .evaluators import PANOPTIC_TYPES as PANOPTIC_EVALUATORS

__all__ = ["ConfigValidationError", "config_problems", "dataset_classes", "validate_config"]

logger = logging.getLogger(__name__)

PACKAGE = "qsegformers"
FIXED_MATCHER = "FixedMatcher"
INSTANCE_EVALUATORS = ("coco", "cityscapes_instance")
INSTANCE_MAPPERS = ("mask_former_instance", "coco_instance_lsj")


class ConfigValidationError(ValueError):
    """The config has one or more problems; the message lists them all."""


def _registry_problem(registry, name: str, key: str) -> List[str]:
    if name in registry:
        return []
    choices = ", ".join(sorted(k for k, _ in registry))
    return [f"{key} = {name!r} is not registered (choose one of: {choices})"]


def _is_qsegformers_arch(cfg) -> bool:
    name = cfg.MODEL.META_ARCHITECTURE
    return name in META_ARCH_REGISTRY and META_ARCH_REGISTRY.get(name).__module__.startswith(PACKAGE)


def _name_problems(cfg) -> List[str]:
    problems = _registry_problem(META_ARCH_REGISTRY, cfg.MODEL.META_ARCHITECTURE, "MODEL.META_ARCHITECTURE")
    problems += _registry_problem(DATASET_MAPPER_REGISTRY, cfg.INPUT.DATASET_MAPPER_NAME, "INPUT.DATASET_MAPPER_NAME")
    if not _is_qsegformers_arch(cfg):
        return problems
    mf, head = cfg.MODEL.MASK_FORMER, cfg.MODEL.SEM_SEG_HEAD
    checks = [
        (BACKBONE_REGISTRY, cfg.MODEL.BACKBONE.NAME, "MODEL.BACKBONE.NAME"),
        (SEM_SEG_HEADS_REGISTRY, head.NAME, "MODEL.SEM_SEG_HEAD.NAME"),
        (PIXEL_DECODER_REGISTRY, head.PIXEL_DECODER_NAME, "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME"),
        (TRANSFORMER_DECODER_REGISTRY, mf.TRANSFORMER_DECODER_NAME, "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME"),
    ]
    if mf.MATCHER_NAME:
        checks.append((MATCHER_REGISTRY, mf.MATCHER_NAME, "MODEL.MASK_FORMER.MATCHER_NAME"))
    if mf.CRITERION_NAME:
        checks.append((CRITERION_REGISTRY, mf.CRITERION_NAME, "MODEL.MASK_FORMER.CRITERION_NAME"))
    for registry, name, key in checks:
        problems += _registry_problem(registry, name, key)
    return problems


def dataset_classes(cfg, dataset_name: str) -> Tuple[str, Optional[list]]:
    """``(metadata field, class list)`` that ``NUM_CLASSES`` must match for ``dataset_name``; the list is
    None when the metadata has none. Instance data (evaluator "coco"/"cityscapes_instance", or trained
    with an instance mapper) uses ``thing_classes``, any other ``stuff_classes`` (else ``thing_classes``)."""
    meta = MetadataCatalog.get(dataset_name)
    instance_only = (meta.get("evaluator_type") in INSTANCE_EVALUATORS
                     or (dataset_name in cfg.DATASETS.TRAIN and cfg.INPUT.DATASET_MAPPER_NAME in INSTANCE_MAPPERS))
    field = "thing_classes" if instance_only else "stuff_classes"
    classes = meta.get(field)
    if classes is None and not instance_only:
        field, classes = "thing_classes", meta.get("thing_classes")
    return field, classes


def _num_classes_problems(cfg) -> List[str]:
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    datasets = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if num_classes == NUM_CLASSES_FROM_DATASET:
        counts = {name: len(classes) for name, (_, classes) in ((n, dataset_classes(cfg, n)) for n in datasets)
                  if classes is not None}
        found = (f"set it to the class count ({', '.join(f'{n!r}: {c}' for n, c in counts.items())})" if counts
                 else "no dataset of DATASETS.TRAIN / DATASETS.TEST lists its classes in its metadata; set it")
        return [f"MODEL.SEM_SEG_HEAD.NUM_CLASSES = {num_classes} (take it from the dataset) was not resolved: "
                f"only qsegformers.engine.setup() and the tools resolve it; {found}"]
    problems = []
    for dataset_name in datasets:
        field, classes = dataset_classes(cfg, dataset_name)
        if classes is not None and len(classes) != num_classes:
            problems.append(
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES = {num_classes}, but dataset {dataset_name!r} has "
                f"{len(classes)} classes in its metadata ({field}); set NUM_CLASSES {len(classes)} "
                f"(or {NUM_CLASSES_FROM_DATASET} to take it from the dataset)"
            )
    return problems


def _panoptic_problems(cfg) -> List[str]:
    """Test sets evaluated for PQ need a thing and a stuff class (panopticapi divides PQ_th and PQ_st by
    their class counts); a custom panoptic set evaluated for mIoU needs its semantic labels."""
    test = cfg.MODEL.MASK_FORMER.TEST
    problems = []
    for dataset_name in cfg.DATASETS.TEST:
        meta = MetadataCatalog.get(dataset_name)
        if meta.get("evaluator_type") not in PANOPTIC_EVALUATORS:
            continue
        things = set(meta.get("thing_dataset_id_to_contiguous_id", {}))
        stuff = set(meta.get("stuff_dataset_id_to_contiguous_id", {})) - things
        source = meta.get("panoptic_json", "its metadata")
        for kind, ids in (("stuff", stuff), ("thing", things)):
            if test.PANOPTIC_ON and not ids and meta.get("stuff_dataset_id_to_contiguous_id") is not None:
                problems.append(
                    f"dataset {dataset_name!r} has no {kind} class ({source}), so its PQ_{kind[:2]} cannot be "
                    f"computed (panopticapi divides by the number of {kind} classes): add a {kind} category, "
                    f"or set MODEL.MASK_FORMER.TEST.PANOPTIC_ON False and evaluate it with SEMANTIC_ON / "
                    f"INSTANCE_ON (a things-only set is best trained as FORMAT coco_instance)")
        key = meta.get(CUSTOM_CONFIG_KEY_FIELD)
        if key and test.SEMANTIC_ON and not meta.get("sem_seg_root"):
            problems.append(
                f"MODEL.MASK_FORMER.TEST.SEMANTIC_ON is True, but dataset {dataset_name!r} has no semantic "
                f"labels ({key}.SEM_SEG_ROOT is empty): set {key}.SEM_SEG_ROOT or SEMANTIC_ON False")
    return problems


def _decoder_problems(cfg) -> List[str]:
    mf, head = cfg.MODEL.MASK_FORMER, cfg.MODEL.SEM_SEG_HEAD
    if not _is_qsegformers_arch(cfg) or mf.TRANSFORMER_DECODER_NAME not in TRANSFORMER_DECODER_REGISTRY:
        return []
    problems = []
    decoder_cls = TRANSFORMER_DECODER_REGISTRY.get(mf.TRANSFORMER_DECODER_NAME)
    levels = decoder_cls.num_feature_levels
    if levels is not None and len(head.IN_FEATURES) < levels:
        problems.append(
            f"MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = {mf.TRANSFORMER_DECODER_NAME!r} reads {levels} "
            f"multi-scale feature levels, but the pixel decoder {head.PIXEL_DECODER_NAME!r} gets only "
            f"{len(head.IN_FEATURES)} features (MODEL.SEM_SEG_HEAD.IN_FEATURES = {list(head.IN_FEATURES)})"
        )
    own_matcher = getattr(decoder_cls, "matcher_name", "")
    if (mf.MATCHER_NAME == FIXED_MATCHER and own_matcher != FIXED_MATCHER
            and mf.NUM_OBJECT_QUERIES != head.NUM_CLASSES):
        problems.append(
            f"MODEL.MASK_FORMER.MATCHER_NAME = {FIXED_MATCHER!r} assigns query k to class k, but decoder "
            f"{mf.TRANSFORMER_DECODER_NAME!r} makes MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = "
            f"{mf.NUM_OBJECT_QUERIES} queries for MODEL.SEM_SEG_HEAD.NUM_CLASSES = {head.NUM_CLASSES} classes"
        )
    return problems


def config_problems(cfg) -> List[str]:
    """Every problem found in ``cfg`` (empty when it is fine)."""
    # Importing the package registers every stage, mapper and dataset the names may refer to.
    import qsegformers  # noqa: F401

    problems = _name_problems(cfg)
    try:
        check_unsupported_keys(cfg)
    except ValueError as err:
        problems.append(str(err))
    problems += _num_classes_problems(cfg)
    problems += _panoptic_problems(cfg)
    problems += _decoder_problems(cfg)
    return problems


def validate_config(cfg) -> None:
    """Raise :class:`ConfigValidationError` listing every problem of ``cfg``, if there is any."""
    problems = config_problems(cfg)
    if problems:
        listing = "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, 1))
        raise ConfigValidationError(f"The config has {len(problems)} problem(s):\n{listing}")
