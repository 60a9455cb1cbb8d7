"""Tests of qsegformers.engine.launch: gloo CPU processes and the SyncBN fallback.

Kept apart from the trainer tests: every launched process imports this module, so it imports little.
"""
import pytest
from detectron2.config import get_cfg
from detectron2.utils import comm

from qsegformers.engine.launch import launch, use_cpu_sync_bn

NUM_PROCESSES = 2


def _gather_world(output_file):
    """Run in each launched process: record what every rank sees."""
    ranks = comm.all_gather((comm.get_rank(), comm.get_local_rank(), comm.get_world_size()))
    if comm.is_main_process():
        with open(output_file, "w") as f:
            f.write(repr(sorted(ranks)))


def test_cpu_launch_runs_gloo_processes_with_detectron2_comm(tmp_path):
    output_file = tmp_path / "world.txt"
    launch(_gather_world, NUM_PROCESSES, args=(str(output_file),), device="cpu")
    expected = [(rank, rank, NUM_PROCESSES) for rank in range(NUM_PROCESSES)]
    assert output_file.read_text() == repr(expected)


def test_single_cpu_process_runs_in_place():
    assert launch(comm.get_world_size, 1, device="cpu") == 1


def test_multi_machine_cpu_launch_needs_a_url():
    with pytest.raises(ValueError, match="--dist-url"):
        launch(comm.get_world_size, NUM_PROCESSES, num_machines=2, device="cpu")


def test_sync_bn_becomes_naive_sync_bn():
    cfg = get_cfg()
    cfg.MODEL.RESNETS.NORM = "SyncBN"
    cfg.MODEL.FPN.NORM = "GN"
    assert use_cpu_sync_bn(cfg) == ["MODEL.RESNETS.NORM"]
    assert (cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM) == ("naiveSyncBN", "GN")
