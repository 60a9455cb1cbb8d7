"""Config set-up shared by the command-line tools (demo, analysis, benchmark, export).

Unlike ``train_net.py``'s ``setup`` it writes nothing to ``OUTPUT_DIR``: it builds the frozen config
from a YAML file and ``KEY VALUE`` overrides, adapts it to this machine (``MODEL.DEVICE`` cpu without
CUDA, see :func:`qsegformers.engine.defaults.adapt_cfg_to_machine`), and on CPU sets the torch thread
count the training entry point would use.
"""
import logging
from typing import List, Optional

import torch
from detectron2.config import CfgNode

from ..engine.defaults import adapt_cfg_to_machine, cpu_threads_per_process, get_qsegformers_cfg

__all__ = ["setup_tool_cfg"]

logger = logging.getLogger(__name__)


def setup_tool_cfg(config_file: str, opts: Optional[List[str]] = None, device: str = "") -> CfgNode:
    """The frozen config of ``config_file`` with ``opts`` (detectron2 ``KEY VALUE`` list) merged.

    Args:
        device: when given, overrides ``MODEL.DEVICE`` (before the machine check, so "cuda" without a GPU
            still falls back to "cpu" with a warning).
    """
    cfg = get_qsegformers_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts or []))
    if device:
        cfg.MODEL.DEVICE = device
    for note in adapt_cfg_to_machine(cfg):
        logger.warning(note)
    cfg.freeze()
    threads = cpu_threads_per_process(cfg)
    if threads:
        torch.set_num_threads(threads)
    return cfg
