"""Distributed training through ``qsegformers.engine.launch``: two gloo CPU processes end with the same
parameters as each other and as one process with the same global batch; the criterion averages the
number of target masks over the ranks.

The model is a tiny per-pixel classifier whose loss is a sum over the batch divided by a fixed count,
so the DDP gradient average equals the single-process gradient; the data are the toy images through
the real semantic mapper (random resize, crop and flip), so the test also checks that every global
sample gets the same augmentation whatever the number of ranks and data-loader workers.
"""
import os

import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog
from detectron2.engine import default_argument_parser
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm

from qsegformers.engine import Trainer, launch, setup
from qsegformers.losses.criterion import SetCriterion

NUM_PROCESSES = 2
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(REPO, "configs", "toy", "semantic-segmentation", "maskformer2_R18_toy.yaml")
ARCH_NAME = "QsegDistributedTestArch"
IGNORE_LABEL = 255
CHANNELS = 4
CROP = 48
TINY = [
    "--config-file", CONFIG,
    "MODEL.META_ARCHITECTURE", ARCH_NAME,
    "MODEL.DEVICE", "cpu",
    "SOLVER.OPTIMIZER", "SGD",  # Adam would magnify rounding differences of near-zero gradients
    "SOLVER.BASE_LR", "0.5",
    "SOLVER.IMS_PER_BATCH", "4",  # 2 images per rank with 2 processes
    "SOLVER.MAX_ITER", "3",
    "SOLVER.WARMUP_ITERS", "0",
    "INPUT.MIN_SIZE_TRAIN", "(48, 64, 80)",
    "INPUT.CROP.SIZE", f"({CROP}, {CROP})",
    "INPUT.SIZE_DIVISIBILITY", str(CROP),
    "INPUT.COLOR_AUG_SSD", "True",
    "DATASETS.TEST", "()",
]
TOLERANCE = 1e-5


class QsegDistributedTestArch(torch.nn.Module):
    """Conv-GroupNorm-ReLU-conv per-pixel classifier; loss = summed cross-entropy / (images * pixels)."""

    def __init__(self, cfg):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, CHANNELS, 3, padding=1), torch.nn.GroupNorm(1, CHANNELS), torch.nn.ReLU(),
            torch.nn.Conv2d(CHANNELS, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 1),
        )

    def forward(self, batched_inputs):
        images = torch.stack([x["image"].float() / 255.0 for x in batched_inputs])
        targets = torch.stack([x["sem_seg"] for x in batched_inputs])
        logits = self.net(images)
        loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_LABEL, reduction="sum")
        return {"loss_sem_seg": loss / targets.numel()}


if ARCH_NAME not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(QsegDistributedTestArch)


def _train_and_save(args, output_file):
    """Run in each process: train, then save every rank's final parameters (main process)."""
    trainer = Trainer(setup(args))
    trainer.resume_or_load(resume=False)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    final = {n.replace("module.", "", 1): p.detach().clone() for n, p in trainer.model.named_parameters()}
    initial = {n.replace("module.", "", 1): p for n, p in initial.items()}
    gathered = comm.all_gather(final)
    if comm.is_main_process():
        torch.save({"ranks": gathered, "initial": initial}, output_file)


def _args(output_dir, num_workers):
    opts = TINY + ["DATALOADER.NUM_WORKERS", str(num_workers), "OUTPUT_DIR", str(output_dir)]
    return default_argument_parser().parse_args(opts)


def test_two_processes_match_each_other_and_one_process(tmp_path):
    DatasetCatalog.get("qseg_toy_sem_seg_train")  # generate the toy data once, before the processes start
    two, one = tmp_path / "two.pth", tmp_path / "one.pth"
    launch(_train_and_save, NUM_PROCESSES, args=(_args(tmp_path / "ddp", 0), str(two)), device="cpu")
    launch(_train_and_save, 1, args=(_args(tmp_path / "single", 1), str(one)), device="cpu")
    ranks = torch.load(two, weights_only=True)["ranks"]
    single = torch.load(one, weights_only=True)
    assert len(ranks) == NUM_PROCESSES
    reference = single["ranks"][0]
    assert ranks[0].keys() == ranks[1].keys() == reference.keys()
    for name in reference:
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between ranks"
        torch.testing.assert_close(ranks[0][name], reference[name], rtol=0, atol=TOLERANCE)
    moved = max((reference[n] - single["initial"][n]).abs().max().item() for n in reference)
    assert moved > 100 * TOLERANCE, "training did not change the weights: the comparison would be vacuous"


def _num_masks(output_file):
    """Rank r holds r * 2 + 1 target masks: the criterion normalises by the mean over ranks."""
    targets = [{"labels": torch.zeros(comm.get_rank() * 2 + 1, dtype=torch.int64)}]
    values = comm.all_gather(SetCriterion.get_num_masks(None, targets, torch.device("cpu")))
    if comm.is_main_process():
        torch.save(torch.tensor(values), output_file)


def test_criterion_averages_the_number_of_masks_over_ranks(tmp_path):
    output_file = tmp_path / "num_masks.pth"
    launch(_num_masks, NUM_PROCESSES, args=(str(output_file),), device="cpu")
    expected = sum(r * 2 + 1 for r in range(NUM_PROCESSES)) / NUM_PROCESSES  # (1 + 3) / 2 = 2
    assert torch.load(output_file).tolist() == [expected] * NUM_PROCESSES
