"""``train_net.py --eval-only`` on a real dataset config, from a checkpoint, on a miniature copy.

The official config is used unchanged except for a small model (ResNet-18, 2 decoder layers, 10
queries) and a small test size, so the run takes seconds. The checks: the model that ``--eval-only``
evaluates has exactly the saved weights, and the metrics it reports equal the ones of the in-memory
model that was saved, so the checkpoint round trip, the dataset registration, the test loader and the
evaluator wiring all work for that dataset/task combination.
"""
import importlib.util
import math
import os
from unittest import mock

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser

from qsegformers.engine import Trainer, setup

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

SMALL_MODEL = [
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
    "MODEL.MASK_FORMER.DEC_LAYERS", "2",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "10",
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64",
    "INPUT.MIN_SIZE_TEST", "32",
    "INPUT.MAX_SIZE_TEST", "64",
    "DATALOADER.NUM_WORKERS", "0",
    "TEST.AUG.ENABLED", "False",
]


def _train_net():
    spec = importlib.util.spec_from_file_location("train_net", os.path.join(REPO, "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flat_metrics(results):
    return {(task, name): value for task, metrics in results.items() for name, value in metrics.items()}


def check_eval_only(config: str, tmp_path, expected_tasks, extra_opts=()) -> dict:
    """Save a random small model for ``configs/<config>``, evaluate it with ``--eval-only`` and
    assert the metrics equal those of the saved model evaluated in memory.

    Args:
        config: path under ``configs/``.
        expected_tasks: the result keys the dataset's evaluators must report
            (e.g. {"sem_seg"} or {"panoptic_seg", "sem_seg", "segm"}).
        extra_opts: more config overrides (e.g. the class count of a miniature whose class list
            is written by its prepare script).

    Returns:
        The results of the ``--eval-only`` run.
    """
    config_file = os.path.join(REPO, "configs", config)
    opts = [*SMALL_MODEL, *extra_opts, "OUTPUT_DIR", str(tmp_path / "out")]
    args = default_argument_parser().parse_args(["--config-file", config_file, "--eval-only", *opts])
    cfg = setup(args)
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    expected = Trainer.test(cfg, model)

    args.opts = [*opts, "MODEL.WEIGHTS", str(tmp_path / "model.pth")]
    evaluated = []
    real_test = Trainer.test

    def recording_test(cfg, model, evaluators=None):
        evaluated.append(model)
        return real_test(cfg, model, evaluators)

    with mock.patch.object(Trainer, "test", side_effect=recording_test):
        results = _train_net().main(args)

    assert len(evaluated) == 1
    loaded, saved = evaluated[0].state_dict(), model.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved), f"{config}: the checkpoint did not load"

    assert set(results) == set(expected_tasks), f"{config}: evaluated {sorted(results)}"
    got, want = _flat_metrics(results), _flat_metrics(expected)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert (math.isnan(value) and math.isnan(got[key])) or got[key] == value, (config, key, got[key], value)
    return results
