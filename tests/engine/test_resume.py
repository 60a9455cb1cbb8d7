"""Exact resume through train_net.py: a run killed with SIGKILL after a checkpoint and resumed ends with
the same weights (bitwise, CPU) as an uninterrupted run, and its metrics log has no gap or duplicate."""
import json
import os
import signal
import subprocess
import sys
import time

import torch

from qsegformers.engine.hooks import truncate_metrics_log

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(REPO, "configs", "toy", "semantic-segmentation", "maskformer2_R18_toy.yaml")
N = 3  # checkpoint period; the full run has 2N iterations
TINY = [
    "--config-file", CONFIG,
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "64",  # random point sampling still on: its RNG must continue
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "6",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "2",
    "SOLVER.MAX_ITER", str(2 * N),
    "SOLVER.CHECKPOINT_PERIOD", str(N),
    "DATALOADER.NUM_WORKERS", "0",
    "INPUT.MIN_SIZE_TRAIN", "(64, 80, 96)",  # random resize, crop and flip: augmentations must continue
    "INPUT.CROP.SIZE", "(64, 64)",
    "INPUT.SIZE_DIVISIBILITY", "64",
    "DATASETS.TEST", "()",
]
POLL_SECONDS = 0.01
TIMEOUT = 120


def _command(output_dir, *extra):
    return [sys.executable, os.path.join(REPO, "train_net.py"), *extra, *TINY, "OUTPUT_DIR", str(output_dir)]


def _run(output_dir, *extra):
    proc = subprocess.run(_command(output_dir, *extra), cwd=REPO, capture_output=True, text=True,
                          timeout=TIMEOUT, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _run_and_kill_after_checkpoint(output_dir):
    """Start the full run and SIGKILL it as soon as the checkpoint of iteration N-1 is tagged."""
    tag = output_dir / "last_checkpoint"
    proc = subprocess.Popen(_command(output_dir), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ))
    deadline = time.monotonic() + TIMEOUT
    try:
        while not (tag.exists() and tag.read_text() == f"model_{N - 1:07d}.pth"):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within the time limit"
            time.sleep(POLL_SECONDS)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _iterations(output_dir):
    with open(output_dir / "metrics.json") as f:
        return [json.loads(line)["iteration"] for line in f]


def test_killed_and_resumed_run_matches_the_straight_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(straight)
    _run_and_kill_after_checkpoint(resumed)
    assert not (resumed / "model_final.pth").exists(), "the kill came after the end of training"

    log = _run(resumed, "--resume")
    assert f"Starting training from iteration {N}" in log

    final_straight = torch.load(straight / "model_final.pth", weights_only=True)
    final_resumed = torch.load(resumed / "model_final.pth", weights_only=True)
    assert final_straight["iteration"] == final_resumed["iteration"] == 2 * N - 1
    model_straight, model_resumed = final_straight["model"], final_resumed["model"]
    assert model_straight.keys() == model_resumed.keys()
    different = [k for k in model_straight if not torch.equal(model_straight[k], model_resumed[k])]
    assert not different, f"weights differ after resume: {different[:5]}"
    # the first N iterations trained the weights, so equal weights are not equal initialisations
    first = torch.load(straight / f"model_{N - 1:07d}.pth", weights_only=True)["model"]
    assert any(not torch.equal(first[k], model_straight[k]) for k in model_straight)
    for key in ("optimizer",):
        state_a, state_b = final_straight[key]["state"], final_resumed[key]["state"]
        assert all(torch.equal(state_a[i]["exp_avg"], state_b[i]["exp_avg"]) for i in state_a)

    iters_straight, iters_resumed = _iterations(straight), _iterations(resumed)
    assert iters_resumed == sorted(set(iters_resumed)), f"duplicate or unordered records: {iters_resumed}"
    assert iters_resumed == iters_straight
    assert N - 1 in iters_resumed and 2 * N - 1 in iters_resumed  # written at the checkpoint and the end


def test_metrics_log_is_cut_in_place_for_the_open_writer(tmp_path):
    """Records after the checkpoint and a line cut by the kill go; the writer's append handle, opened
    before the resume, keeps writing into the same file."""
    path = tmp_path / "metrics.json"
    path.write_text("".join(json.dumps({"iteration": i, "loss": i / 10}) + "\n" for i in range(6)) + '{"itera')
    with open(path, "a") as writer:  # as detectron2's JSONWriter holds it
        assert truncate_metrics_log(str(path), 4) == 3  # iterations 4, 5 and the cut line
        writer.write(json.dumps({"iteration": 4, "loss": 0.0}) + "\n")
    assert _iterations(tmp_path) == [0, 1, 2, 3, 4]
    assert truncate_metrics_log(str(path), 10) == 0
    assert truncate_metrics_log(str(tmp_path / "missing.json"), 0) == 0
