#!/usr/bin/env python
"""Inference latency, throughput and peak memory of a config's model, and the same for one training iteration.

Examples::

    python tools/benchmark.py --config-file configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml \\
        --sizes 512 640x480 --batch 1 --mode inference --opts MODEL.DEVICE cuda
    python tools/benchmark.py --config-file CFG --sizes 128 --batch 2 --mode both --json bench.json

Inference: ``model(inputs)`` in eval mode under ``torch.no_grad`` on a batch of random images of each size
(the model normalises and pads them, and post-processes to the input size, as in evaluation).
Training: one iteration of detectron2's trainer on generated targets: the forward pass returning the weighted
losses (inside an ``EventStorage`` at ``--iter``, as the trainer runs it, so iteration schedules such as PFT's
attention loss see it), backward, and a step of the optimizer ``SOLVER.*`` builds
(``qsegformers.engine.build_optimizer``, with its gradient clipping). Targets are random boxes as instance
masks, or, for models whose query k stands for class k (``FixedMatcher``: PFT, SegViT ATM), a semantic map
(one mask per class). The loss terms of the last call are logged and written to ``--json``.
Times are medians over ``--repeats`` calls after ``--warmup`` untimed ones. Peak memory:
``torch.cuda.max_memory_allocated`` on GPU; on CPU the process's peak RSS from ``resource.getrusage`` (a
process-wide high-water mark; see ``qsegformers/utils/benchmark.py``). Weights do not change the timings,
so ``MODEL.WEIGHTS`` is ignored.
"""
import argparse
import json
import logging
import sys
from typing import List, Tuple

import torch
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from tabulate import tabulate

from qsegformers.engine import build_optimizer
from qsegformers.utils.benchmark import (
    BenchmarkResult,
    generated_batch,
    median_time,
    memory_kind,
    needs_semantic_targets,
    peak_memory_mib,
    reset_peak_memory,
    train_step,
)
from qsegformers.utils.tool_setup import setup_tool_cfg

logger = logging.getLogger("qsegformers.tools.benchmark")

MODES = ("inference", "train", "both")
SIZE_SEPARATOR = "x"


def parse_size(text: str) -> Tuple[int, int]:
    """"512" -> (512, 512); "480x640" -> (480, 640) (height x width)."""
    parts = text.lower().split(SIZE_SEPARATOR)
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"size {text!r} is not N or HxW with positive integers")
    return (int(parts[0]), int(parts[-1]))


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[(512, 512)], help="N or HxW, one or more")
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--mode", choices=MODES, default="both")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per case")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per case (median reported)")
    parser.add_argument("--iter", type=int, default=0, dest="iteration",
                        help="training iteration the train step stands for (read by iteration schedules)")
    parser.add_argument("--device", default="", help="overrides MODEL.DEVICE (cpu, cuda, cuda:1 ...)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def benchmark_inference(model, cfg, size, args, device) -> BenchmarkResult:
    model.eval()
    inputs = generated_batch(args.batch, *size, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, with_targets=False)
    reset_peak_memory(device)

    def call():
        with torch.no_grad():
            model(inputs)

    median = median_time(call, device, args.warmup, args.repeats)
    return BenchmarkResult("inference", list(size), args.batch, args.repeats, median, args.batch / median,
                           peak_memory_mib(device), memory_kind(device))


def benchmark_train(model, optimizer, cfg, size, args, device) -> BenchmarkResult:
    model.train()
    inputs = generated_batch(args.batch, *size, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, with_targets=True,
                             semantic=needs_semantic_targets(model))
    reset_peak_memory(device)
    last_losses = {}

    def call():
        last_losses.update(train_step(model, optimizer, inputs, args.iteration))

    median = median_time(call, device, args.warmup, args.repeats)
    logger.info("train %dx%d loss terms: %s", *size,
                ", ".join(f"{name} {value:.4g}" for name, value in sorted(last_losses.items())))
    return BenchmarkResult("train", list(size), args.batch, args.repeats, median, args.batch / median,
                           peak_memory_mib(device), memory_kind(device), last_losses)


def format_table(results: List[BenchmarkResult]) -> str:
    rows = [[r.mode, f"{r.size[0]}x{r.size[1]}", r.batch, f"{r.median_s * 1e3:.1f}", f"{r.images_per_s:.2f}",
             f"{r.peak_memory_mib:.0f}"] for r in results]
    headers = ["mode", "size", "batch", "median ms", "images/s", "peak MiB"]
    kinds = sorted({r.memory_kind for r in results})
    lines = [tabulate(rows, headers=headers, tablefmt="pipe"), f"peak memory: {', '.join(kinds)}"]
    lines += [f"train {r.size[0]}x{r.size[1]}: loss {sum(r.loss_terms.values()):.4g} = sum of "
              f"{len(r.loss_terms)} weighted terms" for r in results if r.loss_terms]
    return "\n".join(lines)


def main(argv=None) -> List[BenchmarkResult]:
    args = get_parser().parse_args(argv)
    cfg = setup_tool_cfg(args.config_file, list(args.opts) + ["MODEL.WEIGHTS", ""], device=args.device)
    device = torch.device(cfg.MODEL.DEVICE)
    model = build_model(cfg)
    logger.info("torch %s, device %s, %d CPU threads", torch.__version__, device, torch.get_num_threads())
    results = []
    if args.mode in ("inference", "both"):
        results += [benchmark_inference(model, cfg, size, args, device) for size in args.sizes]
    if args.mode in ("train", "both"):
        optimizer = build_optimizer(cfg, model)
        results += [benchmark_train(model, optimizer, cfg, size, args, device) for size in args.sizes]
    sys.stdout.write(format_table(results) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in results], f, indent=2)
    return results


if __name__ == "__main__":
    setup_logger(name="fvcore")
    setup_logger(name="qsegformers")
    main()
