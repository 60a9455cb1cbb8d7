"""Timing and memory of inference and of one training iteration (used by ``tools/benchmark.py``).

Generated training targets: instance-like ones (random boxes, a class may repeat) for models that match
queries to targets (Hungarian), semantic ones (one mask per present class, disjoint, covering the image)
for models whose query k stands for class k (``FixedMatcher``: PFT, SegViT ATM), which reject an image
with a class twice. :func:`needs_semantic_targets` decides from the built model.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` (reset before each case: the case's own
peak of tensor memory). On CPU, the process's peak resident set size from ``resource.getrusage``
(``ru_maxrss``): a high-water mark of the whole process since it started (Python, libraries, model and
all earlier cases included), so it only grows from case to case. ``tracemalloc`` is not used: it
does not see the memory torch allocates for tensors.
"""
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List

import torch
from detectron2.structures import BitMasks, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from ..matching.fixed import FixedMatcher
from .loss_checks import check_losses_finite

__all__ = [
    "BenchmarkResult",
    "generated_batch",
    "median_time",
    "memory_kind",
    "needs_semantic_targets",
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
SEMANTIC_CLASSES_PER_IMAGE = 3  # a background class and up to two boxes of other classes painted over it
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
    loss_terms: Dict[str, float] = field(default_factory=dict)  # train: weighted losses of the last call

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


def _instance_targets(height: int, width: int, num_classes: int, generator: torch.Generator) -> Instances:
    """``INSTANCES_PER_IMAGE`` random boxes of random classes (a class may repeat, boxes may overlap)."""
    instances = Instances((height, width))
    instances.gt_classes = torch.randint(0, num_classes, (INSTANCES_PER_IMAGE,), generator=generator)
    masks = torch.stack([_random_box_mask(height, width, generator) for _ in range(INSTANCES_PER_IMAGE)])
    instances.gt_masks = BitMasks(masks)
    return instances


def _semantic_targets(height: int, width: int, num_classes: int, generator: torch.Generator) -> Instances:
    """A semantic map as instances: distinct classes, the first one covering the image, each later one a
    random box painted over the earlier ones; one mask per class still visible (disjoint, covering)."""
    classes = torch.randperm(num_classes, generator=generator)[: min(SEMANTIC_CLASSES_PER_IMAGE, num_classes)]
    slot = torch.zeros(height, width, dtype=torch.int64)  # index into ``classes`` of each pixel
    for k in range(1, len(classes)):
        slot[_random_box_mask(height, width, generator)] = k
    visible = slot.unique()  # sorted; a box covered by later boxes has no pixel left
    instances = Instances((height, width))
    instances.gt_classes = classes[visible]
    instances.gt_masks = BitMasks(slot[None] == visible[:, None, None])
    return instances


def needs_semantic_targets(model: nn.Module) -> bool:
    """True when the model's query k stands for class k (its criterion uses the ``FixedMatcher``, or its
    decoder declares ``matcher_name = "FixedMatcher"`` or ``queries_are_classes``): training then needs one
    target per class. ``model``: a built qsegformers meta-architecture."""
    predictor = model.sem_seg_head.predictor
    matcher = getattr(getattr(model, "criterion", None), "matcher", None)
    return (
        isinstance(matcher, FixedMatcher)
        or getattr(predictor, "matcher_name", "") == FixedMatcher.__name__
        or bool(getattr(predictor, "queries_are_classes", False))
    )


def generated_batch(
    batch: int, height: int, width: int, num_classes: int, *, with_targets: bool, semantic: bool = False,
    seed: int = 0,
) -> List[Dict]:
    """``batch`` detectron2 input dicts with random 3 x H x W images (0-255) and, with ``with_targets``,
    ``instances`` (gt_masks BitMasks N x H x W, gt_classes N): ``INSTANCES_PER_IMAGE`` random boxes, or with
    ``semantic`` up to ``SEMANTIC_CLASSES_PER_IMAGE`` distinct classes with disjoint masks covering the image."""
    generator = torch.Generator().manual_seed(seed)
    make_targets = _semantic_targets if semantic else _instance_targets
    inputs = []
    for _ in range(batch):
        item = {"image": torch.rand(3, height, width, generator=generator) * PIXEL_MAX,
                "height": height, "width": width}
        if with_targets:
            item["instances"] = make_targets(height, width, num_classes, generator)
        inputs.append(item)
    return inputs


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, inputs: List[Dict], iteration: int = 0
) -> Dict[str, float]:
    """One training iteration as detectron2's trainer runs it: forward (weighted losses) inside an
    ``EventStorage`` at ``iteration`` (what iteration-dependent losses read, e.g. PFT's attention-loss
    schedule), backward, the trainer's non-finite-loss check, then the optimizer step.
    Returns the weighted loss terms."""
    with EventStorage(iteration):
        loss_dict = model(inputs)
    losses = sum(loss_dict.values())
    optimizer.zero_grad(set_to_none=True)
    losses.backward()
    check_losses_finite(loss_dict, iteration)
    optimizer.step()
    return {name: float(value.detach()) for name, value in loss_dict.items()}
