"""tools/benchmark.py --mode train on every method's real config (shrunk to 64 x 64 and a few channels, each
method's mechanism on), and the generated targets: semantic ones (one mask per class) for the fixed-matcher
methods (PFT, SegViT ATM), which reject the instance-like ones (a class repeated)."""
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import FrozenSet, List, Sequence

import pytest
import torch
from detectron2.modeling import build_model

from qsegformers.engine.defaults import get_qsegformers_cfg
from qsegformers.matching.fixed import FixedMatcher
from qsegformers.utils.benchmark import generated_batch, needs_semantic_targets

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "benchmark.py"
ADE = REPO / "configs" / "ade20k" / "semantic-segmentation"
TOY_CFG = REPO / "configs" / "toy" / "semantic-segmentation" / "maskformer2_R18_toy.yaml"
SIZE = 64
NUM_CLASSES = 8
MAX_ITER = 100
PFT_ATTN_END = 75  # PFT's attention loss runs while iter < ATTN_LOSS_END_FRACTION (0.75) * MAX_ITER

COMMON = ["MODEL.DEVICE", "cpu", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(NUM_CLASSES), "SOLVER.MAX_ITER", str(MAX_ITER)]
R18 = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
SMALL_HEAD = ["MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
              "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.NHEADS", "4",
              "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256"]
SMALL_QUERIES = ["MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "10"]
M2F_LAYERS = 4  # DEC_LAYERS: 3 decoder layers + the prediction on the learnable queries
FASEG_LAYERS = 6  # one round (1/32, 1/16, 1/8, HRCA 1/4) + the final 1/32 layer + the initial prediction
PFT_LAYERS = 3  # 2 decoder layers + the prediction on the input queries
ATM_STAGES = 3  # one ATM stage per returned ViT block
SHRUNK_ATM_LAYERS = 2  # every layer of the Shrunk ATM stage is supervised
SMALL_VIT = ["MODEL.VIT.EMBED_DIM", "64", "MODEL.VIT.NUM_HEADS", "4", "MODEL.VIT.DEPTH", "3",
             "MODEL.SEM_SEG_HEAD.CONVS_DIM", "64", "MODEL.ATM.EMBED_DIM", "32", "MODEL.ATM.NUM_HEADS", "4"]
SMALL_SWIN = ["MODEL.SWIN.EMBED_DIM", "32", "MODEL.SWIN.DEPTHS", "[1, 1, 1, 1]", "MODEL.SWIN.NUM_HEADS", "[1, 2, 4, 8]"]

MASK_KEYS = ("loss_ce", "loss_mask", "loss_dice")
MP_KEYS = ("loss_ce_mp", "loss_mask_mp", "loss_dice_mp")
PFT_KEYS = ("loss_ce", "loss_focal_ce", "loss_mask", "loss_dice")


def supervised(keys: Sequence[str], outputs: int, first_aux: int = 0) -> FrozenSet[str]:
    """``keys`` on the final output and on aux outputs ``first_aux .. outputs - 2`` (suffix ``_i``)."""
    return frozenset(keys) | {f"{k}_{i}" for k in keys for i in range(first_aux, outputs - 1)}


@dataclass(frozen=True)
class Case:
    name: str
    config: Path
    opts: List[str]
    fixed_matching: bool  # query k = class k: semantic targets
    loss_keys: FrozenSet[str]


CASES = [
    Case("mask2former", ADE / "maskformer2_R50_bs16_160k.yaml",
         R18 + SMALL_HEAD + SMALL_QUERIES + ["MODEL.MASK_FORMER.DEC_LAYERS", str(M2F_LAYERS)],
         False, supervised(MASK_KEYS, M2F_LAYERS)),
    Case("pft", ADE / "pft" / "pft_R50_bs16_160k.yaml",
         R18 + SMALL_HEAD + ["MODEL.MASK_FORMER.DEC_LAYERS", str(PFT_LAYERS)],
         # the attention loss needs a cross-attention: not on the input-query prediction (aux 0)
         True, supervised(PFT_KEYS, PFT_LAYERS) | supervised(["loss_attn"], PFT_LAYERS, first_aux=1)),
    Case("faseg", ADE / "faseg" / "faseg_R50_bs16_160k.yaml",
         R18 + SMALL_HEAD + SMALL_QUERIES + ["MODEL.MASK_FORMER.DEC_LAYERS", str(FASEG_LAYERS)],
         False, supervised(MASK_KEYS, FASEG_LAYERS)),
    Case("mp_former", ADE / "mp_former" / "mpformer_R50_bs16_160k.yaml",
         R18 + SMALL_HEAD + SMALL_QUERIES
         + ["MODEL.MASK_FORMER.DEC_LAYERS", str(M2F_LAYERS), "MODEL.MP.NUM_QUERIES", "10"],
         False, supervised(MASK_KEYS + MP_KEYS, M2F_LAYERS)),
    Case("segvit_atm", ADE / "segvit" / "segvit_vit_base_bs16_160k.yaml",
         SMALL_VIT + ["MODEL.VIT.OUT_BLOCKS", "[1, 2, 3]", "MODEL.SEM_SEG_HEAD.IN_FEATURES", "['blk3', 'blk2', 'blk1']",
                      "MODEL.ATM.LAYERS_PER_STAGE", "2"],
         True, supervised(MASK_KEYS, ATM_STAGES)),
    Case("segvit_shrunk", ADE / "segvit" / "segvit_shrunk_vit_base_bs16_160k.yaml",
         SMALL_VIT + ["MODEL.VIT.OUT_BLOCKS", "[1, 3]", "MODEL.SEM_SEG_HEAD.IN_FEATURES", "['blk1', 'blk3']",
                      "MODEL.SHRUNK.QD_BLOCK", "1", "MODEL.SHRUNK.QU_LAYERS_PER_STAGE", "1",
                      "MODEL.SHRUNK.ATM_LAYERS", str(SHRUNK_ATM_LAYERS), "INPUT.CROP.SIZE", f"({SIZE}, {SIZE})"],
         True, supervised(MASK_KEYS, SHRUNK_ATM_LAYERS)),
    Case("semask", ADE / "semask_swin" / "maskformer2_semask_swin_tiny_bs16_160k.yaml",
         SMALL_SWIN + SMALL_HEAD + SMALL_QUERIES + ["MODEL.MASK_FORMER.DEC_LAYERS", str(M2F_LAYERS)],
         False, supervised(MASK_KEYS, M2F_LAYERS) | {"loss_sem_prior"}),
]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("qseg_benchmark_train_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_train_mode(tool, monkeypatch, case: Case, json_path: Path, extra_args=()):
    """tools/benchmark.py --mode train, one step, recording the built model (with its parameters before the
    step) and the kind of targets the tool generated."""
    seen = {}

    def build_and_record(cfg):
        model = build_model(cfg)
        seen["model"] = model
        seen["before"] = {k: v.detach().clone() for k, v in model.named_parameters()}
        return model

    def batch_and_record(*args, **kwargs):
        seen.setdefault("semantic", []).append(kwargs.get("semantic", False))
        return generated_batch(*args, **kwargs)

    monkeypatch.setattr(tool, "build_model", build_and_record)
    monkeypatch.setattr(tool, "generated_batch", batch_and_record)
    torch.manual_seed(0)
    results = tool.main(["--config-file", str(case.config), "--sizes", str(SIZE), "--batch", "1", "--mode", "train",
                         "--warmup", "0", "--repeats", "1", "--json", str(json_path), *extra_args,
                         "--opts", *COMMON, *case.opts])
    return results, seen


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_train_mode_runs_one_step_of_every_method(tool, case, monkeypatch, capsys, tmp_path):
    out = tmp_path / "bench.json"
    (result,), seen = run_train_mode(tool, monkeypatch, case, out)
    printed = capsys.readouterr().out
    model = seen["model"]
    assert needs_semantic_targets(model) is case.fixed_matching
    assert seen["semantic"] == [case.fixed_matching]
    assert result.mode == "train" and result.size == [SIZE, SIZE] and result.median_s > 0
    assert set(result.loss_terms) == case.loss_keys
    assert all(math.isfinite(v) for v in result.loss_terms.values())
    assert sum(result.loss_terms.values()) > 0
    changed = [k for k, v in model.named_parameters() if not torch.equal(v.detach(), seen["before"][k])]
    assert any(k.startswith("backbone.") for k in changed)
    assert any(k.startswith("sem_seg_head.predictor.") for k in changed)
    assert f"| train  | {SIZE}x{SIZE}  |" in printed
    assert f"train {SIZE}x{SIZE}: loss " in printed and f"sum of {len(case.loss_keys)} weighted terms" in printed
    (record,) = json.loads(out.read_text())
    assert record["mode"] == "train" and record["loss_terms"] == pytest.approx(result.loss_terms)


def test_train_mode_iteration_reaches_pft_attention_schedule(tool, monkeypatch, tmp_path):
    """--iter plays the trainer's iteration: at 0.75 * MAX_ITER PFT's attention loss is off, the rest is on."""
    pft = next(c for c in CASES if c.name == "pft")
    (result,), _ = run_train_mode(tool, monkeypatch, pft, tmp_path / "late.json", ["--iter", str(PFT_ATTN_END)])
    assert set(result.loss_terms) == supervised(PFT_KEYS, PFT_LAYERS)


@pytest.mark.parametrize("num_classes", [2, NUM_CLASSES, 150])
def test_semantic_targets_are_a_semantic_map_that_fixed_matching_accepts(num_classes):
    batch = generated_batch(16, 48, 40, num_classes, with_targets=True, semantic=True, seed=3)
    targets = []
    for item in batch:
        classes, masks = item["instances"].gt_classes, item["instances"].gt_masks.tensor
        assert masks.dtype == torch.bool and masks.shape == (len(classes), 48, 40)
        assert classes.unique().numel() == classes.numel()  # each class at most once
        assert ((classes >= 0) & (classes < num_classes)).all()
        assert torch.equal(masks.sum(0), torch.ones(48, 40, dtype=torch.int64))  # disjoint and covering
        assert masks.flatten(1).any(1).all()  # no empty mask
        targets.append({"labels": classes, "masks": masks})
    assert max(len(t["labels"]) for t in targets) == min(3, num_classes)  # boxes of other classes are visible
    indices = FixedMatcher()({"pred_masks": torch.zeros(len(batch), num_classes, 12, 10)}, targets)
    for (pred_idx, tgt_idx), target in zip(indices, targets):
        assert torch.equal(target["labels"][tgt_idx], pred_idx)  # query c gets the mask of class c


def test_instance_targets_repeat_classes_and_fixed_matching_rejects_them():
    # 3 boxes of 2 classes: some class repeats (the bug the semantic targets fix)
    (item,) = generated_batch(1, 32, 32, num_classes=2, with_targets=True)
    labels = item["instances"].gt_classes
    assert labels.unique().numel() < labels.numel()
    target = {"labels": labels, "masks": item["instances"].gt_masks.tensor}
    with pytest.raises(ValueError, match="more than once"):
        FixedMatcher()({"pred_masks": torch.zeros(1, 2, 8, 8)}, [target])


@pytest.mark.parametrize("matcher, expected", [("", False), ("FixedMatcher", True)])
def test_target_kind_follows_the_built_models_matcher(matcher, expected):
    """The Mask2Former toy config with MATCHER_NAME FixedMatcher (query k = class k): the model, not the
    config's file name, decides."""
    cfg = get_qsegformers_cfg()
    cfg.merge_from_file(str(TOY_CFG))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.MASK_FORMER.MATCHER_NAME", matcher,
                         "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", str(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)])
    assert needs_semantic_targets(build_model(cfg)) is expected
