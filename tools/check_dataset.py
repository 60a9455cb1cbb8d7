#!/usr/bin/env python
"""Check a dataset before training: read every annotation and report what would break or skew training.

Examples::

    python tools/check_dataset.py configs/custom/semantic-segmentation/maskformer2_R18_custom.yaml
    python tools/check_dataset.py CONFIG --dataset my_val             # only this dataset of the config
    python tools/check_dataset.py --dataset ade20k_sem_seg_val        # a registered (built-in) dataset
    python tools/check_dataset.py CONFIG --opts DATASETS.CUSTOM.TRAIN.JSON other.json

With a config, its ``DATASETS.CUSTOM`` slots are registered first and the datasets of ``DATASETS.TRAIN``
and ``DATASETS.TEST`` are checked, plus the config's start-up validation. Reported, each with the file:
missing or unreadable images, label PNGs saved as RGB colour instead of class ids, label values
outside the classes, empty or degenerate masks, category ids not in the category list, a panoptic set
with no stuff (or thing) class, image / label size mismatches (details in
``qsegformers/data/datasets/custom_check.py``).

Exit status: 0 when no problem is found, 1 otherwise (the problems are listed, then a summary table).
"""
import argparse
import logging
import sys
from typing import List, Tuple

from detectron2.utils.logger import setup_logger

from qsegformers.data.datasets.custom_check import check_dataset, format_summary
from qsegformers.data.datasets.custom_check_files import Problem
from qsegformers.utils.tool_setup import setup_tool_cfg

logger = logging.getLogger("qsegformers.tools.check_dataset")

SETUP_ERRORS = (OSError, ValueError)  # a config or DATASETS.CUSTOM slot that cannot be loaded


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config_file", nargs="?", metavar="CONFIG", help="config whose datasets are checked")
    parser.add_argument("--dataset", nargs="+", default=[], metavar="NAME",
                        help="registered dataset name(s) to check (default: DATASETS.TRAIN and TEST of CONFIG)")
    parser.add_argument("--max-listed", type=int, default=20, help="problems listed per kind (all are counted)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return parser


def _config_datasets(args) -> Tuple[List[str], List[Problem]]:
    """Register the config's datasets; return the names to check and the config's problems."""
    from qsegformers.engine.validation import config_problems

    try:
        cfg = setup_tool_cfg(args.config_file, args.opts)
    except SETUP_ERRORS as e:
        return [], [Problem("unloadable", args.config_file, str(e))]
    problems = [Problem("config", args.config_file, p) for p in config_problems(cfg)]
    names = list(dict.fromkeys(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)))
    return names, problems


def main(argv=None) -> int:
    """Check the datasets; returns the exit status (0: no problem)."""
    parser = get_parser()
    args = parser.parse_args(argv)
    if not args.config_file and not args.dataset:
        parser.error("give a CONFIG, --dataset NAME, or both")
    names, problems = _config_datasets(args) if args.config_file else ([], [])
    if args.dataset:
        names = list(args.dataset)
    if not args.config_file:
        import qsegformers  # noqa: F401  (registers the built-in and toy datasets)
    total = 0
    for name in names:
        found, count = check_dataset(name, progress=not args.no_progress)
        problems += found
        total += count
        sys.stdout.write(f"{name}: {count} records, {len(found)} problem(s)\n")
    if problems:
        sys.stdout.write(format_summary(problems, args.max_listed) + "\n")
        sys.stdout.write(f"{len(problems)} problem(s) found in {len(names)} dataset(s), {total} records.\n")
        return 1
    sys.stdout.write(f"No problem found in {len(names)} dataset(s), {total} records.\n")
    return 0


if __name__ == "__main__":
    setup_logger(name="qsegformers")
    sys.exit(main())
