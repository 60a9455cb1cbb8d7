"""The resumable training data loader used by :class:`qsegformers.engine.Trainer`.

Same inputs and outputs as detectron2's ``build_detection_train_loader`` (lists of mapped dicts, one
list per iteration and rank), built from :mod:`.samplers` and :mod:`.seeded_dataset` so that the
stream of batches is a pure function of ``(seed, iteration, rank, world size)``:

* ``start_iter`` (set by the trainer after resuming) makes the stream continue at that iteration;
* the torch ``DataLoader`` gets its own seeded generator, so creating it draws nothing from torch's
  global generator (which the model's own randomness uses);
* the ``DataLoader`` is created lazily, at the first batch, after the trainer has set ``start_iter``;
  workers therefore start once, at the right place in the stream;
* the sampler runs in the main process (map-style dataset + batch sampler), so the order of the
  batches does not depend on ``DATALOADER.NUM_WORKERS``.

Only ``DATALOADER.SAMPLER_TRAIN = "TrainingSampler"`` is supported (:func:`is_resumable`); the trainer
falls back to detectron2's loader for the others, with a warning that resume restarts their stream.
"""
import logging
from typing import Callable, Iterator, List, Optional, Sequence

import torch
from detectron2.data import get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator, worker_init_reset_seed
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm

from .samplers import ResumableBatchSampler, ResumableTrainingSampler, aspect_ratio_groups
from .seeded_dataset import SeededMapDataset

__all__ = ["ResumableTrainLoader", "build_resumable_train_loader", "is_resumable", "RESUMABLE_SAMPLERS"]

logger = logging.getLogger(__name__)

RESUMABLE_SAMPLERS = ("TrainingSampler",)


def is_resumable(cfg) -> bool:
    """Whether ``cfg.DATALOADER.SAMPLER_TRAIN`` has a resumable implementation here."""
    return cfg.DATALOADER.SAMPLER_TRAIN in RESUMABLE_SAMPLERS


class ResumableTrainLoader:
    """Iterable of per-rank batches (lists of mapped dicts) that starts at ``start_iter``.

    ``seed`` and ``start_iter`` may be changed until the first batch is drawn from an iterator.
    """

    def __init__(self, records: Sequence[dict], mapper: Callable, *, seed: int, total_batch_size: int,
                 num_workers: int = 0, aspect_ratio_grouping: bool = False, shuffle: bool = True,
                 start_iter: int = 0, rank: Optional[int] = None, world_size: Optional[int] = None):
        """
        Args:
            records: the training dataset dicts.
            mapper: dataset dict -> training dict (or None to drop it).
            seed: data seed, the same on every rank.
            total_batch_size: images per iteration over all ranks (SOLVER.IMS_PER_BATCH).
            num_workers, aspect_ratio_grouping: as ``DATALOADER.*``.
            shuffle: shuffle each pass over the data.
            start_iter: the iteration of the first batch.
            rank, world_size: default: detectron2's ``comm``.
        """
        self.rank = comm.get_rank() if rank is None else rank
        self.world_size = comm.get_world_size() if world_size is None else world_size
        if total_batch_size <= 0 or total_batch_size % self.world_size:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH = {total_batch_size} must be a positive multiple of the number of "
                f"processes ({self.world_size})."
            )
        self.records = records if isinstance(records, DatasetFromList) else DatasetFromList(list(records), copy=False)
        self.mapper, self.seed, self.start_iter = mapper, seed, start_iter
        self.batch_size = total_batch_size // self.world_size
        self.num_workers, self.shuffle = num_workers, shuffle
        self.groups: Optional[List[int]] = aspect_ratio_groups(records) if aspect_ratio_grouping else None

    def build_data_loader(self) -> torch.utils.data.DataLoader:
        """The torch ``DataLoader`` of the current ``seed`` and ``start_iter``."""
        sampler = ResumableTrainingSampler(len(self.records), seed=self.seed, rank=self.rank,
                                           world_size=self.world_size, shuffle=self.shuffle)
        batch_sampler = ResumableBatchSampler(sampler, self.batch_size, start_iter=self.start_iter,
                                              groups=self.groups)
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        return torch.utils.data.DataLoader(
            SeededMapDataset(self.records, self.mapper, self.seed),
            batch_sampler=batch_sampler,
            num_workers=self.num_workers,
            collate_fn=trivial_batch_collator,
            worker_init_fn=worker_init_reset_seed,
            generator=generator,
        )

    def __iter__(self) -> Iterator[List[dict]]:
        logger.info("Training data stream: seed %d, starting at iteration %d (rank %d of %d).",
                    self.seed, self.start_iter, self.rank, self.world_size)
        yield from self.build_data_loader()


def build_resumable_train_loader(cfg, mapper: Callable, seed: int) -> ResumableTrainLoader:
    """The :class:`ResumableTrainLoader` of ``cfg.DATASETS.TRAIN`` (detectron2's dataset filtering)."""
    records = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    return ResumableTrainLoader(
        records, mapper, seed=seed, total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        num_workers=cfg.DATALOADER.NUM_WORKERS, aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
    )
