"""MP-Former under DDP: two gloo CPU processes train a few toy iterations and end with identical parameters.

The number of MP groups depends on each rank's own largest GT count, so the ranks' MP parts differ in
size; only parameters are synchronised, every parameter (``label_enc`` included) gets a gradient on
every rank, and every rank reports the same loss keys.
"""
import json
import os

from detectron2.engine import default_argument_parser
from detectron2.utils import comm

from qsegformers.engine import Trainer, launch, setup

NUM_PROCESSES = 2
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(REPO, "configs", "toy", "instance-segmentation", "mpformer_R18_toy.yaml")
TINY = [
    "MODEL.DEVICE", "cpu",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "64",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "6",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
    "SOLVER.IMS_PER_BATCH", "4",  # 2 images per rank
    "SOLVER.MAX_ITER", "3",
    "SOLVER.WARMUP_ITERS", "0",
    "DATALOADER.NUM_WORKERS", "0",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.CROP.SIZE", "(64, 64)",
    "INPUT.SIZE_DIVISIBILITY", "64",
    "DATASETS.TEST", "()",  # no evaluation
]


def _train_and_report(args, output_file):
    """Run in each process: train, then gather every rank's parameters and MP slot counts."""
    cfg = setup(args)
    trainer = Trainer(cfg)
    slots = []

    def record(module, inputs, outputs):
        mp = outputs.get("mp_outputs")
        slots.append(0 if mp is None else mp["num_groups"] * mp["max_targets"])

    trainer.model.module.sem_seg_head.predictor.register_forward_hook(record)
    trainer.resume_or_load(resume=False)
    label_enc = trainer.model.module.sem_seg_head.predictor.label_enc.weight
    initial = label_enc.detach().clone()
    trainer.train()
    trained = (label_enc.detach() - initial).abs().max().item()
    params = {n: p.detach().clone() for n, p in trainer.model.module.named_parameters()}
    gathered = comm.all_gather((params, slots))
    if comm.is_main_process():
        (p0, s0), (p1, s1) = gathered
        diff = max((p0[n] - p1[n]).abs().max().item() for n in p0)
        with open(output_file, "w") as f:
            report = {"max_diff": diff, "names": sorted(p0) == sorted(p1), "slots": [s0, s1], "trained": trained}
            json.dump(report, f)


def test_two_cpu_processes_end_with_identical_parameters(tmp_path):
    output_file = tmp_path / "ddp.json"
    args = default_argument_parser().parse_args(
        ["--config-file", CONFIG, *TINY, "OUTPUT_DIR", str(tmp_path / "out")]
    )
    launch(_train_and_report, NUM_PROCESSES, args=(args, str(output_file)), device="cpu")
    report = json.loads(output_file.read_text())
    assert report["names"] and report["max_diff"] == 0.0
    assert report["trained"] > 0  # the MP label embedding was updated: MP losses reached it
    # both ranks ran the MP part in each of the 3 steps (the toy images all have segments)
    assert all(len(s) == 3 and min(s) > 0 for s in report["slots"]), report["slots"]
