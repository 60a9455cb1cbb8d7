"""Timing and memory of inference and of one training iteration (used by ``tools/benchmark.py``).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` (reset before each case: the case's own
peak of tensor memory). On CPU, the process's peak resident set size from ``resource.getrusage``
(``ru_maxrss``): a high-water mark of the whole process since it started (Python, libraries, model and
all earlier cases included), so it only grows from case to case. ``tracemalloc`` is not used: it
does not see the memory torch allocates for tensors.
"""
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List

import torch
from detectron2.structures import BitMasks, Instances
from torch import nn

__all__ = [
    "BenchmarkResult",
    "generated_batch",
    "median_time",
    "memory_kind",
    "peak_memory_mib",
    "reset_peak_memory",
    "train_step",
]

PIXEL_MAX = 255.0
MIB = 2 ** 20
RU_MAXRSS_UNIT = 1024  # ru_maxrss is in KiB on Linux
CUDA_PEAK = "cuda max_memory_allocated"
CPU_PEAK = "process peak RSS (getrusage)"
INSTANCES_PER_IMAGE = 3
MIN_BOX_FRACTION = 0.2  # generated target boxes span 20-60% of each image side
MAX_BOX_FRACTION = 0.6


@dataclass
class BenchmarkResult:
    """One measured case. ``median_s``: median seconds per call (one batch) over ``repeats`` timed calls."""

    mode: str
    size: List[int]
    batch: int
    repeats: int
    median_s: float
    images_per_s: float
    peak_memory_mib: float
    memory_kind: str

    def as_dict(self) -> Dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory in MiB (see the module docstring for what it measures on each device)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RU_MAXRSS_UNIT / MIB


def memory_kind(device: torch.device) -> str:
    return CUDA_PEAK if device.type == "cuda" else CPU_PEAK


def _random_box_mask(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    fractions = torch.empty(2).uniform_(MIN_BOX_FRACTION, MAX_BOX_FRACTION, generator=generator)
    box_h, box_w = max(1, int(height * fractions[0])), max(1, int(width * fractions[1]))
    top = int(torch.randint(0, height - box_h + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - box_w + 1, (1,), generator=generator))
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[top: top + box_h, left: left + box_w] = True
    return mask


def generated_batch(
    batch: int, height: int, width: int, num_classes: int, *, with_targets: bool, seed: int = 0
) -> List[Dict]:
    """``batch`` detectron2 input dicts with random 3 x H x W images (0-255) and, with ``with_targets``,
    ``instances`` of ``INSTANCES_PER_IMAGE`` random boxes (gt_masks BitMasks N x H x W, gt_classes N)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for _ in range(batch):
        item = {"image": torch.rand(3, height, width, generator=generator) * PIXEL_MAX,
                "height": height, "width": width}
        if with_targets:
            instances = Instances((height, width))
            instances.gt_classes = torch.randint(0, num_classes, (INSTANCES_PER_IMAGE,), generator=generator)
            masks = torch.stack([_random_box_mask(height, width, generator) for _ in range(INSTANCES_PER_IMAGE)])
            instances.gt_masks = BitMasks(masks)
            item["instances"] = instances
        inputs.append(item)
    return inputs


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: List[Dict]) -> float:
    """One training iteration as detectron2's trainer runs it: forward (weighted losses), backward, step.
    Returns the total loss."""
    losses = sum(model(inputs).values())
    optimizer.zero_grad(set_to_none=True)
    losses.backward()
    optimizer.step()
    return float(losses.detach())
