"""Launch one or several training processes, on GPUs (NCCL) or on the CPU (gloo).

detectron2 v0.6's ``launch`` asserts CUDA and hard-codes NCCL, its ``create_ddp_model`` passes GPU
``device_ids`` even for CPU modules, and ``SyncBN`` refuses CPU modules under DDP (notes #8-#10).
On CUDA this module defers to detectron2; on the CPU it starts ``num_gpus_per_machine`` processes
that join a gloo process group set up like detectron2's (global and per-machine groups in
``detectron2.utils.comm``), wraps ``create_ddp_model`` for CPU modules, and
:func:`use_cpu_sync_bn` turns ``SyncBN`` config values into ``naiveSyncBN``.
"""
import faulthandler
import functools
import logging
import warnings
from datetime import timedelta
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import detectron2.engine.defaults as d2_defaults
from detectron2.engine.launch import _find_free_port
from detectron2.engine.launch import launch as d2_launch
from detectron2.utils import comm

__all__ = ["launch", "use_cpu_sync_bn", "DEFAULT_TIMEOUT"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)
AUTO_DIST_URL = "auto"
LOCALHOST_URL = "tcp://127.0.0.1:{port}"
CPU_BACKEND = "gloo"
SYNC_BN = "SyncBN"
CPU_SYNC_BN = "naiveSyncBN"  # detectron2's all-reduce BN, works with gloo


def _patch_create_ddp_model() -> None:
    """Make detectron2's ``create_ddp_model`` wrap CPU modules without GPU ``device_ids`` (#9)."""
    original = d2_defaults.create_ddp_model
    if getattr(original, "_qsegformers_cpu", False):
        return

    @functools.wraps(original)
    def create_ddp_model(model, **kwargs):
        if next(model.parameters()).device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        with warnings.catch_warnings():
            # torch 2.13 deprecates the broadcast_buffers=False that detectron2 passes (notes S4).
            warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
            return original(model, **kwargs)

    create_ddp_model._qsegformers_cpu = True
    d2_defaults.create_ddp_model = create_ddp_model


def use_cpu_sync_bn(cfg) -> List[str]:
    """Replace every ``"SyncBN"`` value in (unfrozen) ``cfg`` by ``"naiveSyncBN"``, in place.

    ``nn.SyncBatchNorm`` refuses CPU modules under DDP; detectron2's ``NaiveSyncBatchNorm`` computes
    the same statistics with plain all-reduce and has the same parameters and buffers, so checkpoints
    are interchangeable. Returns the changed keys.
    """
    changed = []

    def visit(node, prefix):
        for key, value in node.items():
            full_key = f"{prefix}{key}"
            if isinstance(value, dict):
                visit(value, full_key + ".")
            elif value == SYNC_BN:
                setattr(node, key, CPU_SYNC_BN)  # raises on a frozen config
                changed.append(full_key)

    visit(cfg, "")
    return changed


def _resolve_dist_url(dist_url: Optional[str], num_machines: int) -> str:
    if dist_url is None or dist_url == AUTO_DIST_URL:
        if num_machines > 1:
            raise ValueError("--dist-url must name the main machine (tcp://HOST:PORT) in multi-machine jobs.")
        return LOCALHOST_URL.format(port=_find_free_port())
    return dist_url


def _cpu_worker(local_rank, main_func, world_size, procs_per_machine, machine_rank, dist_url, args, timeout):
    faulthandler.enable()  # a crash in gloo's C++ threads then shows the Python stack of every thread
    global_rank = machine_rank * procs_per_machine + local_rank
    dist.init_process_group(
        CPU_BACKEND, init_method=dist_url, world_size=world_size, rank=global_rank, timeout=timeout
    )
    try:
        num_machines = world_size // procs_per_machine
        for i in range(num_machines):
            group = dist.new_group(list(range(i * procs_per_machine, (i + 1) * procs_per_machine)))
            if i == machine_rank:
                comm._LOCAL_PROCESS_GROUP = group
        _patch_create_ddp_model()
        comm.synchronize()
        main_func(*args)
        # Tear down only once every rank is done: gloo aborts if a peer closes its pairs mid-teardown.
        comm.synchronize()
    finally:
        dist.destroy_process_group()
        # Drop detectron2's references to the destroyed groups so that they, and the TCP store rank 0
        # serves, are freed now instead of in arbitrary order during interpreter shutdown.
        comm._LOCAL_PROCESS_GROUP = None
        comm._get_global_gloo_group.cache_clear()


def launch_cpu(
    main_func: Callable,
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args=(),
    timeout: timedelta = DEFAULT_TIMEOUT,
):
    """Run ``main_func(*args)`` in ``num_processes_per_machine`` CPU processes joined by gloo.

    With a single process in total, ``main_func`` runs in this process. ``main_func`` must be
    importable by name (spawned processes unpickle it); guard the caller with ``__main__``.
    """
    world_size = num_machines * num_processes_per_machine
    if world_size == 1:
        return main_func(*args)
    dist_url = _resolve_dist_url(dist_url, num_machines)
    logger.info("Launching %d CPU processes (%s, %s).", num_processes_per_machine, CPU_BACKEND, dist_url)
    mp.spawn(
        _cpu_worker,
        nprocs=num_processes_per_machine,
        args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )
    return None


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args=(),
    device: str = "cuda",
    timeout: timedelta = DEFAULT_TIMEOUT,
):
    """detectron2's ``launch`` on CUDA; gloo CPU processes when ``device == "cpu"`` or CUDA is absent.

    On the CPU, ``num_gpus_per_machine`` is the number of processes per machine.
    """
    if device != "cpu" and torch.cuda.is_available():
        if num_machines * num_gpus_per_machine > 1:
            dist_url = _resolve_dist_url(dist_url, num_machines)
        return d2_launch(
            main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args, timeout
        )
    return launch_cpu(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args, timeout)
