"""Build the training dataset mapper named by ``INPUT.DATASET_MAPPER_NAME``."""
from ...registries import DATASET_MAPPER_REGISTRY, lookup
from . import instance, panoptic, semantic  # noqa: F401  (register the mappers)

__all__ = ["build_dataset_mapper"]


def build_dataset_mapper(cfg, is_train: bool = True):
    """Instantiate the registered mapper ``cfg.INPUT.DATASET_MAPPER_NAME`` (e.g. "mask_former_semantic").

    Raises KeyError naming INPUT.DATASET_MAPPER_NAME and the registered names for an unknown name.
    """
    mapper_cls = lookup(DATASET_MAPPER_REGISTRY, cfg.INPUT.DATASET_MAPPER_NAME, "INPUT.DATASET_MAPPER_NAME")
    return mapper_cls(cfg, is_train)
