"""The resumable training stream (samplers, seeded dataset, loader): same indices as detectron2's
TrainingSampler, exact continuation from any iteration, and augmentations that depend only on the
sample's stream position (not on workers, ranks, or what was loaded before)."""
import itertools
import random

import numpy as np
import torch
from detectron2.data.samplers import TrainingSampler

from qsegformers.data.samplers import ResumableBatchSampler, ResumableTrainingSampler, aspect_ratio_groups
from qsegformers.data.seeded_dataset import sample_seed
from qsegformers.data.train_loader import ResumableTrainLoader

SIZE, SEED, BATCH = 7, 5, 4
ITERS = 5


def _take(iterable, n):
    return list(itertools.islice(iterable, n))


def _random_mapper(record):
    """Uses the three generators augmentations use."""
    return {"id": record["id"], "draws": (random.random(), float(np.random.rand()), float(torch.rand(1)))}


def _records():
    return [{"id": i, "width": 10 + i, "height": 10 if i % 3 else 30} for i in range(SIZE)]


def test_single_rank_stream_is_detectron2s_training_sampler_stream():
    ours = [index for index, _ in _take(ResumableTrainingSampler(SIZE, seed=SEED), 3 * SIZE)]
    assert ours == _take(iter(TrainingSampler(SIZE, seed=SEED)), 3 * SIZE)
    positions = [p for _, p in _take(ResumableTrainingSampler(SIZE, seed=SEED), 3 * SIZE)]
    assert positions == list(range(3 * SIZE))


def test_ranks_share_each_global_batch_and_start_iter_continues_the_stream():
    single = _take(ResumableBatchSampler(ResumableTrainingSampler(SIZE, seed=SEED), BATCH), ITERS)
    ranks = [_take(ResumableBatchSampler(ResumableTrainingSampler(SIZE, seed=SEED, rank=r, world_size=2), BATCH // 2),
                   ITERS) for r in range(2)]
    for i in range(ITERS):
        assert sorted(ranks[0][i] + ranks[1][i], key=lambda k: k[1]) == single[i]
        assert [p for _, p in single[i]] == list(range(i * BATCH, (i + 1) * BATCH))
    resumed = _take(ResumableBatchSampler(ResumableTrainingSampler(SIZE, seed=SEED), BATCH, start_iter=2), ITERS - 2)
    assert resumed == single[2:]


def test_grouped_batches_hold_one_group_and_resume_exactly():
    groups = aspect_ratio_groups(_records())
    assert groups == [1, 0, 0, 1, 0, 0, 1]  # portrait when height > width

    def batches(start):
        return ResumableBatchSampler(ResumableTrainingSampler(SIZE, seed=SEED), BATCH, start_iter=start, groups=groups)

    full = _take(batches(0), ITERS)
    assert all(len({groups[i] for i, _ in batch}) == 1 for batch in full)
    assert _take(batches(3), ITERS - 3) == full[3:]


def _loader(**kwargs):
    return ResumableTrainLoader(_records(), _random_mapper, seed=SEED, total_batch_size=BATCH, rank=0,
                                world_size=1, **kwargs)


def test_loader_augmentations_do_not_depend_on_workers_resume_or_global_rng():
    torch.manual_seed(0)
    expected_next_draw = torch.rand(1)
    torch.manual_seed(0)
    full = _take(iter(_loader()), ITERS)
    assert torch.equal(torch.rand(1), expected_next_draw)  # loading drew nothing from torch's generator

    assert _take(iter(_loader(num_workers=2)), ITERS) == full
    resumed = _loader(num_workers=2)
    resumed.start_iter = 2  # set after construction, as the trainer does after loading a checkpoint
    assert _take(iter(resumed), ITERS - 2) == full[2:]

    # The draws of a sample are those of its own seed, whatever was mapped before it.
    sampler = ResumableTrainingSampler(SIZE, seed=SEED)
    first_key = next(iter(sampler))
    random.seed(sample_seed(SEED, first_key[1]))
    np.random.seed(sample_seed(SEED, first_key[1]))
    torch.default_generator.manual_seed(sample_seed(SEED, first_key[1]))
    assert full[0][0] == _random_mapper(_records()[first_key[0]])
    all_draws = [d["draws"] for batch in full for d in batch]
    assert len(set(all_draws)) == len(all_draws)  # every sample got different random numbers
