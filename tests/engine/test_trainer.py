"""End-to-end tests of the trainer, train_net.py and set-up, with a tiny dummy model.

The dummy meta-architecture, datasets and mapper are registered under test-only names, so these tests
depend on no other qsegformers stage.
"""
import importlib.util
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.engine import default_argument_parser
from detectron2.modeling import META_ARCH_REGISTRY
from PIL import Image

from qsegformers.engine import Trainer, setup
from qsegformers.engine import trainer as trainer_module
from qsegformers.engine.defaults import get_qsegformers_cfg

ARCH_NAME = "QsegEngineTestArch"  # the class name, under which fvcore registers it
TRAIN_NAME, VAL_NAME = "qseg_engine_test_train", "qseg_engine_test_val"
TRAIN_NET = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "train_net.py")
CLASSES = ["a", "b", "c"]
IGNORE_LABEL = 255
IMAGE_SIZE = 16
CHANNELS = 4
MAX_ITER, CHECKPOINT_PERIOD = 6, 3
BASE_LR = 1e-3


class QsegEngineTestArch(torch.nn.Module):
    """Per-pixel classifier with a backbone, a norm and an embedding (all optimizer rules apply)."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = torch.nn.Sequential(
            torch.nn.Conv2d(3, CHANNELS, 3, padding=1), torch.nn.GroupNorm(1, CHANNELS), torch.nn.ReLU()
        )
        self.query_embed = torch.nn.Embedding(1, CHANNELS)
        self.predictor = torch.nn.Conv2d(CHANNELS, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 1)
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)

    def forward(self, batched_inputs):
        device = self.pixel_mean.device
        images = [(x["image"].to(device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = torch.stack(images)
        logits = self.predictor(self.backbone(images) + self.query_embed.weight.view(1, -1, 1, 1))
        if self.training:
            targets = torch.stack([x["sem_seg"].to(device) for x in batched_inputs])
            return {"loss_sem_seg": F.cross_entropy(logits, targets, ignore_index=IGNORE_LABEL)}
        sizes = [(x["height"], x["width"]) for x in batched_inputs]
        return [
            {"sem_seg": F.interpolate(l[None], size, mode="bilinear", align_corners=False)[0]}
            for l, size in zip(logits, sizes)
        ]


def _train_mapper(record):
    image = utils.read_image(record["file_name"], format="BGR").transpose(2, 0, 1).copy()
    label = utils.read_image(record["sem_seg_file_name"]).astype("int64")
    return {"image": torch.as_tensor(image), "sem_seg": torch.as_tensor(label), "height": IMAGE_SIZE,
            "width": IMAGE_SIZE}


@pytest.fixture(scope="module", autouse=True)
def registered(tmp_path_factory):
    """Register the dummy architecture and a tiny semantic dataset (4 train, 2 val images)."""
    if ARCH_NAME not in META_ARCH_REGISTRY:
        META_ARCH_REGISTRY.register(QsegEngineTestArch)
    root = tmp_path_factory.mktemp("engine_data")
    rng = np.random.RandomState(0)
    records = []
    for i in range(6):
        image = rng.randint(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)
        label = (image[..., 0] // (256 // len(CLASSES) + 1)).astype(np.uint8)
        Image.fromarray(image).save(root / f"{i}.png")
        Image.fromarray(label).save(root / f"{i}_sem.png")
        records.append({"file_name": str(root / f"{i}.png"), "sem_seg_file_name": str(root / f"{i}_sem.png"),
                        "height": IMAGE_SIZE, "width": IMAGE_SIZE, "image_id": i})
    for name, part in ((TRAIN_NAME, records[:4]), (VAL_NAME, records[4:])):
        DatasetCatalog.register(name, lambda part=part: [dict(r) for r in part])
        MetadataCatalog.get(name).set(
            stuff_classes=CLASSES, ignore_label=IGNORE_LABEL, evaluator_type="sem_seg"
        )
    yield
    for name in (TRAIN_NAME, VAL_NAME):
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture
def mapper_calls(monkeypatch):
    """Stand in for the ``build_dataset_mapper`` the trainer imported, so that Trainer gets the test mapper from it."""
    calls = []

    def build_dataset_mapper(cfg, is_train):
        calls.append(is_train)
        return _train_mapper

    monkeypatch.setattr(trainer_module, "build_dataset_mapper", build_dataset_mapper)
    return calls


def _cfg(output_dir):
    cfg = get_qsegformers_cfg()
    cfg.MODEL.META_ARCHITECTURE = ARCH_NAME
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = len(CLASSES)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (TRAIN_NAME,), (VAL_NAME,)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.MIN_SIZE_TEST = 0  # no test-time resize
    s = cfg.SOLVER
    s.IMS_PER_BATCH, s.BASE_LR, s.MAX_ITER, s.CHECKPOINT_PERIOD = 2, BASE_LR, MAX_ITER, CHECKPOINT_PERIOD
    s.OPTIMIZER, s.LR_SCHEDULER_NAME, s.WARMUP_ITERS, s.WARMUP_FACTOR = "ADAMW", "WarmupPolyLR", 2, 0.1
    clip = s.CLIP_GRADIENTS
    clip.ENABLED, clip.CLIP_TYPE, clip.CLIP_VALUE = True, "full_model", 1.0
    cfg.TEST.EVAL_PERIOD = 0  # evaluate once, after training
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.freeze()
    return cfg


def _lrs(optimizer):
    return [group["lr"] for group in optimizer.param_groups]


def test_train_checkpoint_and_resume(tmp_path, mapper_calls):
    cfg = _cfg(tmp_path)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert mapper_calls and all(mapper_calls)  # training mapper came from build_dataset_mapper(cfg, True)
    assert math.isfinite(trainer._last_eval_results["sem_seg"]["mIoU"])  # Trainer.test ran on CPU
    final_lrs = _lrs(trainer.optimizer)

    stop = CHECKPOINT_PERIOD - 1  # iteration whose checkpoint we resume from
    saved = torch.load(tmp_path / f"model_{stop:07d}.pth", map_location="cpu")
    assert saved["iteration"] == stop
    assert saved["optimizer"]["state"]  # S1: the optimizer state is checkpointed
    assert saved["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == stop + 1  # S2

    (tmp_path / "last_checkpoint").write_text(f"model_{stop:07d}.pth")
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert (resumed.iter, resumed.start_iter) == (stop, stop + 1)
    state = resumed.optimizer.state_dict()["state"]
    assert state.keys() == saved["optimizer"]["state"].keys()
    for index, param_state in saved["optimizer"]["state"].items():
        for key, value in param_state.items():
            torch.testing.assert_close(state[index][key], value)
    assert resumed.scheduler.last_epoch == stop + 1
    assert _lrs(resumed.optimizer) == [g["lr"] for g in saved["optimizer"]["param_groups"]]
    torch.testing.assert_close(resumed.model.state_dict(), saved["model"])

    resumed.train()
    assert resumed.scheduler.last_epoch == MAX_ITER
    assert _lrs(resumed.optimizer) == pytest.approx(final_lrs)


def _load_train_net():
    spec = importlib.util.spec_from_file_location("qseg_train_net_under_test", TRAIN_NET)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_net_trains_then_evaluates_only(tmp_path, mapper_calls):
    config_file = tmp_path / "config.yaml"
    config_file.write_text(_cfg(tmp_path / "run").dump())
    train_net = _load_train_net()
    args = ["--config-file", str(config_file)]
    train_net.main(default_argument_parser().parse_args(args + ["SOLVER.MAX_ITER", "2"]))
    weights = tmp_path / "run" / "model_final.pth"
    assert weights.is_file()
    eval_args = args + ["--eval-only", "MODEL.WEIGHTS", str(weights)]
    results = train_net.main(default_argument_parser().parse_args(eval_args))
    assert set(results["sem_seg"]) >= {"mIoU", "pACC"}


EVAL_YAML = """\
MODEL:
  DEVICE: cuda
INPUT:
  MIN_SIZE_TRAIN: !!python/object/apply:eval ["[int(x * 0.1 * 512) for x in range(5, 21)]"]
SOLVER:
  AMP:
    ENABLED: true
"""


def test_setup_accepts_official_eval_yaml_and_adapts_to_cpu(tmp_path):
    config_file = tmp_path / "official.yaml"
    config_file.write_text(EVAL_YAML)
    opts = ["OUTPUT_DIR", str(tmp_path / "out"), "MODEL.RESNETS.NORM", "SyncBN"]
    cfg = setup(default_argument_parser().parse_args(["--config-file", str(config_file)] + opts))
    assert list(cfg.INPUT.MIN_SIZE_TRAIN) == [int(x * 0.1 * 512) for x in range(5, 21)]
    assert cfg.is_frozen()
    assert (tmp_path / "out" / "config.yaml").is_file()
    if not torch.cuda.is_available():
        assert cfg.MODEL.DEVICE == "cpu"
        assert cfg.SOLVER.AMP.ENABLED is False
        assert cfg.MODEL.RESNETS.NORM == "naiveSyncBN"
