"""Config set-up for ``train_net.py`` and tools: read, adapt to this machine, freeze, log.

On a machine without CUDA, ``setup`` runs the config on the CPU: ``MODEL.DEVICE`` becomes "cpu"
(detectron2 defaults to "cuda"), AMP is turned off (detectron2's ``AMPTrainer`` asserts CUDA) and
``SyncBN`` becomes ``naiveSyncBN`` (``nn.SyncBatchNorm`` refuses CPU modules under DDP). Each change is
logged as a warning.
"""
import logging
import os
import warnings
from typing import List

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import add_qsegformers_config
from ..data.datasets.custom import register_custom_datasets
from .launch import use_cpu_sync_bn
from .validation import validate_config

__all__ = [
    "setup",
    "get_qsegformers_cfg",
    "adapt_cfg_to_machine",
    "disable_amp_without_cuda",
    "launch_device",
    "cpu_threads_per_process",
]

LOGGER_NAME = "qsegformers"
CPU = "cpu"
CUDA = "cuda"
DEVICE_KEY = "MODEL.DEVICE"


def get_qsegformers_cfg() -> CfgNode:
    """detectron2's default config extended with every qsegformers key."""
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    return cfg


def adapt_cfg_to_machine(cfg: CfgNode) -> List[str]:
    """Make an unfrozen ``cfg`` runnable here, in place; return one message per change made.

    Also registers the datasets of ``DATASETS.CUSTOM`` (and resolves ``NUM_CLASSES`` -1 from them).
    """
    notes = register_custom_datasets(cfg)
    cuda = torch.cuda.is_available()
    if not cuda and not cfg.MODEL.DEVICE.startswith(CPU):
        notes.append(f"CUDA is not available: {DEVICE_KEY} {cfg.MODEL.DEVICE!r} -> {CPU!r}.")
        cfg.MODEL.DEVICE = CPU
    if cfg.SOLVER.AMP.ENABLED and not cuda:
        notes.append("CUDA is not available: SOLVER.AMP.ENABLED True -> False (AMP training needs CUDA).")
        cfg.SOLVER.AMP.ENABLED = False
    if cfg.MODEL.DEVICE.startswith(CPU):
        changed = use_cpu_sync_bn(cfg)
        if changed:
            notes.append(f"SyncBN does not run on CPU processes: naiveSyncBN used for {', '.join(changed)}.")
    return notes


def disable_amp_without_cuda(cfg: CfgNode) -> CfgNode:
    """Return ``cfg``, or a frozen copy with AMP off when AMP is on and CUDA is absent (logged)."""
    if not cfg.SOLVER.AMP.ENABLED or torch.cuda.is_available():
        return cfg
    logging.getLogger(__name__).warning(
        "CUDA is not available: SOLVER.AMP.ENABLED True -> False (AMP training needs CUDA)."
    )
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.AMP.ENABLED = False
    cfg.freeze()
    return cfg


def setup(args) -> CfgNode:
    """Build the frozen config from ``args.config_file`` and ``args.opts`` and set up logging.

    ``args`` comes from detectron2's ``default_argument_parser()``. Official Mask2Former YAML files
    load unchanged, including their ``!!python/object/apply:eval`` lines (detectron2's
    ``merge_from_file`` falls back to ``yaml.unsafe_load``; only load files you trust). The config
    is then validated (:func:`qsegformers.engine.validation.validate_config`): every problem is
    reported at once, before anything is built.
    """
    cfg = get_qsegformers_cfg()
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    notes = adapt_cfg_to_machine(cfg)
    cfg.freeze()
    validate_config(cfg)
    threads = cpu_threads_per_process(cfg)
    if threads:
        torch.set_num_threads(threads)
        notes.append(f"CPU run: {threads} torch thread(s) per process (set OMP_NUM_THREADS to choose).")
    with warnings.catch_warnings():
        # detectron2's default_setup reads args.config_file without closing it (a ResourceWarning).
        warnings.simplefilter("ignore", ResourceWarning)
        default_setup(cfg, args)
    logger = setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name=LOGGER_NAME)
    for note in notes:
        logger.warning(note)
    return cfg


def cpu_threads_per_process(cfg) -> int:
    """Intra-op threads for a CPU run, or 0 to leave torch's choice (GPU runs, OMP_NUM_THREADS set).

    The cores are shared by the training processes and their data-loader workers; oversubscribing
    them with OpenMP threads is very slow on small VMs (measured on a 2-core machine: ResNet-18 forward
    0.10 s with 1 thread, 1.3 s with 2).
    """
    if not cfg.MODEL.DEVICE.startswith(CPU) or "OMP_NUM_THREADS" in os.environ:
        return 0
    busy = max(comm.get_local_size(), 1) * (1 + cfg.DATALOADER.NUM_WORKERS)
    return max(1, (os.cpu_count() or 1) // busy)


def _device_from_opts(opts) -> str:
    keys, values = opts[0::2], opts[1::2]
    for key, value in zip(keys, values):
        if key == DEVICE_KEY:
            return value
    return ""


def launch_device(args) -> str:
    """"cpu" or "cuda": the device ``train_net.py`` launches its processes for.

    "cpu" when CUDA is absent, or when ``MODEL.DEVICE`` (from ``args.opts``, else from the config
    file and its bases) names the CPU. Read before ``setup``, which runs in the launched processes.
    """
    if not torch.cuda.is_available():
        return CPU
    device = _device_from_opts(args.opts)
    if not device and args.config_file:
        loaded = CfgNode.load_yaml_with_base(args.config_file, allow_unsafe=True)
        device = (loaded.get("MODEL") or {}).get("DEVICE") or ""
    return CPU if device.startswith(CPU) else CUDA
