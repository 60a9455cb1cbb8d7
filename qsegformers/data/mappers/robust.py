"""Training mappers that drop a bad sample with one warning instead of crashing a data-loader worker.

A mapper raises a ValueError or OSError (with the file and the reason) for a sample it cannot use:
an undecodable image, a label of another size or with class ids outside ``0..NUM_CLASSES-1``, an
aspect ratio so extreme that resizing makes a side 0. Called directly, it keeps raising (clear errors
in tools and tests); the trainer wraps it in :class:`DropBadSamples`, which logs one warning naming
the file and returns None, so the data loader maps another record instead (detectron2's
``MapDataset`` and :class:`qsegformers.data.seeded_dataset.SeededMapDataset` both do).
"""
import logging
from typing import Callable, Optional

__all__ = ["DropBadSamples", "BAD_SAMPLE_ERRORS"]

logger = logging.getLogger(__name__)

# Errors of one bad sample (ImageReadError and detectron2's SizeMismatchError are ValueErrors).
BAD_SAMPLE_ERRORS = (OSError, ValueError)


class DropBadSamples:
    """``mapper(d)``, or None with one warning when the mapper raises a data error for ``d``."""

    def __init__(self, mapper: Callable[[dict], Optional[dict]]):
        self.mapper = mapper

    def __call__(self, dataset_dict: dict) -> Optional[dict]:
        try:
            return self.mapper(dataset_dict)
        except BAD_SAMPLE_ERRORS as err:
            logger.warning("Dropped training sample %s (%s: %s); another record is used in its place.",
                           dataset_dict.get("file_name"), type(err).__name__, err)
            return None

    def __repr__(self) -> str:
        return f"DropBadSamples({self.mapper!r})"
