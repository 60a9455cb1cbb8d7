"""Resumable training samplers: an infinite, seeded stream of (dataset index, stream position) keys.

detectron2's ``TrainingSampler`` restarts its stream from the beginning when training resumes, so a
resumed run sees the first images again. Here the stream is a pure function of the seed: the global
stream is ``shuffle(range(N)) + shuffle(range(N)) + ...`` drawn from one seeded generator, rank ``r``
of ``W`` takes the positions ``r, r + W, r + 2W, ...`` and cuts them into per-rank batches, and
:class:`ResumableBatchSampler` skips the batches of the iterations already trained. Each key carries
its global stream position, from which :class:`qsegformers.data.seeded_dataset.SeededMapDataset`
derives the sample's augmentation seed, so a resumed run, a run with more data-loader workers and a
run split over more ranks (same global batch) see exactly the same augmented images.

With aspect-ratio grouping, batches are formed per group (landscape / portrait, from the dataset
records' ``width``/``height``), in stream order; skipping replays the grouping, so resume stays exact.
"""
import itertools
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableTrainingSampler", "ResumableBatchSampler", "aspect_ratio_groups", "SampleKey"]

SampleKey = Tuple[int, int]  # (dataset index, global stream position)


class ResumableTrainingSampler(Sampler):
    """Infinite stream of :data:`SampleKey` for one rank; a pure function of ``seed``."""

    def __init__(self, size: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        """
        Args:
            size: number of dataset records (> 0).
            seed: seed of the shuffles, the same on every rank.
            rank, world_size: this rank takes global positions ``rank + k * world_size``.
            shuffle: shuffle each pass over the data (else ``range(size)`` repeated).
        """
        if size <= 0:
            raise ValueError(f"The training set is empty (size {size}): check DATASETS.TRAIN.")
        self.size, self.seed, self.rank, self.world_size, self.shuffle = size, int(seed), rank, world_size, shuffle

    def _global_indices(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        while True:
            if self.shuffle:
                yield from torch.randperm(self.size, generator=generator).tolist()
            else:
                yield from range(self.size)

    def __iter__(self) -> Iterator[SampleKey]:
        stream = enumerate(self._global_indices())
        for position, index in itertools.islice(stream, self.rank, None, self.world_size):
            yield index, position


def aspect_ratio_groups(dataset_dicts: Sequence[dict]) -> List[int]:
    """Group id per record: 0 for width >= height (or unknown size), 1 for portrait images."""
    return [int(d.get("height", 0) > d.get("width", 0)) for d in dataset_dicts]


class ResumableBatchSampler(Sampler):
    """Per-rank batches of ``batch_size`` keys from a :class:`ResumableTrainingSampler`, starting at
    iteration ``start_iter`` (the batches of earlier iterations are generated and skipped)."""

    def __init__(self, sampler: ResumableTrainingSampler, batch_size: int, *, start_iter: int = 0,
                 groups: Optional[Sequence[int]] = None):
        """
        Args:
            sampler: the key stream of this rank.
            batch_size: images per batch on this rank.
            start_iter: index of the first batch produced.
            groups: group id per dataset index; batches then hold keys of one group only.
        """
        self.sampler, self.batch_size, self.start_iter, self.groups = sampler, batch_size, start_iter, groups

    def _batches(self) -> Iterator[List[SampleKey]]:
        if self.groups is None:
            keys = iter(self.sampler)
            while True:
                yield list(itertools.islice(keys, self.batch_size))
        buckets = {}
        for key in self.sampler:
            bucket = buckets.setdefault(self.groups[key[0]], [])
            bucket.append(key)
            if len(bucket) == self.batch_size:
                yield list(bucket)
                bucket.clear()

    def __iter__(self) -> Iterator[List[SampleKey]]:
        return itertools.islice(self._batches(), self.start_iter, None)
