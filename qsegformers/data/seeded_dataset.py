"""A map-style dataset that runs the mapper of each sample under its own seed, and drops bad samples.

Choice made for exact resume (issue 11): the random state the mappers' augmentations use (python
``random``, numpy's global generator, torch's CPU generator) is not checkpointed; instead every sample
is mapped under a seed derived from ``(seed, global stream position, retry)`` (see
:mod:`qsegformers.data.samplers`), and the generators are restored afterwards. The augmentation of a
sample therefore depends neither on what was mapped before it, nor on the data-loader worker that
maps it, nor on the number of ranks, and a resumed run continues bit-for-bit.

A mapper returns ``None`` to drop a sample it cannot use (after logging one warning that names the
file and the reason); another record, chosen by the same seeded generator, is mapped in its place
(detectron2's ``MapDataset`` does the same, with an unseeded choice).
"""
import contextlib
import logging
import random
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .samplers import SampleKey

__all__ = ["SeededMapDataset", "sample_seed", "seeded_rng"]

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_DROPS = 32  # that many dropped replacements in a row means the data set is unusable


def sample_seed(seed: int, position: int, retry: int = 0) -> int:
    """A 32-bit seed for one sample, mixed from the run seed, its stream position and the retry count."""
    sequence = np.random.SeedSequence([seed % 2**63, position, retry])
    return int(sequence.generate_state(1, dtype=np.uint32)[0])


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch's CPU generator with ``seed``; restore their states on exit."""
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)  # CPU only: workers must not initialise CUDA
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class SeededMapDataset(Dataset):
    """``dataset[(index, position)] = mapper(records[index])`` under ``sample_seed(seed, position)``."""

    def __init__(self, records: Sequence[dict], mapper: Callable, seed: int):
        """
        Args:
            records: dataset dicts (a list or detectron2 ``DatasetFromList``); each is given to the mapper.
            mapper: dataset dict -> training dict, or None to drop the sample.
            seed: the run's data seed (the same on every rank).
        """
        self.records, self.mapper, self.seed = records, mapper, seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: SampleKey) -> dict:
        index, position = key
        for retry in range(MAX_CONSECUTIVE_DROPS):
            seed = sample_seed(self.seed, position, retry)
            with seeded_rng(seed):
                data = self.mapper(self.records[index])
            if data is not None:
                return data
            replacement = random.Random(seed).randrange(len(self.records))
            logger.debug("Sample %d (stream position %d) dropped; using record %d.", index, position, replacement)
            index = replacement
        raise RuntimeError(
            f"The mapper dropped {MAX_CONSECUTIVE_DROPS} samples in a row (stream position {position}): "
            f"the training data is unusable; see the warnings above for the files and reasons."
        )
