"""The recorded decoder x task cases and how to run one: shared by ``record_decoder_outputs.py`` (which writes
``recorded/<case>.pt``) and ``test_decoder_outputs.py`` (which reruns each case and compares), so that the
two cannot drift apart.

A case is a real config under ``configs/`` (the toy one where it exists) shrunk by overrides to a tiny model.
Running it (:func:`run_case`) gives one flat record ``{key: value}``:

* ``head.<path>``: the eval-mode head outputs on ``EVAL_BATCH_SIZE`` padded images (``pred_logits``,
  ``pred_masks``, every ``aux_outputs.<i>.*`` and the method's extras, e.g. PFT's ``pred_class_logits``);
* ``result.<i>.*``: eval-mode ``model(inputs)`` for image i: ``sem_seg`` (K x h x w), ``panoptic_seg``
  (h x w ids) and ``segments_info``, ``instances.{pred_masks (bool), pred_boxes, scores, pred_classes}``;
* ``loss.<name>``: every weighted loss term (a float) of one training forward (``torch.manual_seed(FORWARD_SEED)`` right
  before it: point sampling, MP noise, dropout and drop-path draw from the global RNG);
* ``grad_norm.<param>``: the L2 norm of every parameter's gradient after ``backward`` (None: no gradient);
* ``grad.<param>``: the full gradient of a few small predictor parameters (``FULL_GRAD_PATTERN``).

Weights: ``torch.manual_seed(case.model_seed)`` before ``build_model``, then every parameter is redrawn from a
generator seeded by its *name* (:func:`reinit_by_name`), so that the recording depends on the parameter
names and shapes (fixed by the official checkpoints), not on the order in which modules are constructed: a
refactor that only moves code keeps the weights. Inputs come from ``generated_batch`` (seeded generators).
"""
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage
from torch import Tensor, nn

from qsegformers import add_qsegformers_config
from qsegformers.utils.benchmark import generated_batch, needs_semantic_targets

__all__ = [
    "CASES", "CASES_BY_NAME", "RECORDED_DIR", "Case", "build_cfg", "build_case_model", "check_not_degenerate",
    "flatten", "recording_path", "reinit_by_name", "run_case",
]

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
RECORDED_DIR = Path(__file__).resolve().parent / "recorded"

MODEL_SEED = 0  # torch.manual_seed before build_model; also mixed into every parameter's name seed
EVAL_INPUT_SEED = 1  # generated_batch seed of the inference images
TRAIN_INPUT_SEED = 2  # generated_batch seed of the training images and targets
FORWARD_SEED = 3  # torch.manual_seed right before the training forward
TRAIN_BATCH_SIZE = 2
TRAIN_SIZE = (64, 64)
# Inference images: (image height, width) -> (output "height", "width"): the second image is padded in the
# batch, and both outputs are resized (sem_seg_postprocess), as for a test image resized by the mapper.
EVAL_IMAGES = (((64, 64), (32, 32)), ((48, 64), (24, 40)))
EVAL_BATCH_SIZE = len(EVAL_IMAGES)
# Full gradients are stored for the predictor's small class/query parameters; norms for every parameter.
FULL_GRAD_PATTERN = ("class_embed", "query_feat", "class_tokens", "label_enc")
FULL_GRAD_MAX_NUMEL = 4096
# Name-keyed re-initialisation: tensors of 2+ dims ~ U(-g / sqrt(fan_in), g / sqrt(fan_in)); 1-D non-norm
# parameters (biases, ...) ~ U(-b, b); norm scales ~ 1 + U(-b, b); embeddings (learnable queries, class tokens)
# ~ U(-e, e), unit variance as nn.Embedding's N(0, 1), so that queries stay distinct through the decoder.
WEIGHT_GAIN = 6 ** 0.5
EMBEDDING_BOUND = 3 ** 0.5
ONE_D_BOUND = 0.1
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)

# ---- tiny-model overrides ----
TINY_M2F_HEAD = [
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
    "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.NHEADS", "4", "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256",
    "TEST.DETECTIONS_PER_IMAGE", "10",
]
# The toy panoptic thresholds (0.8) keep nothing on an untrained model: lower them so that some queries are
# kept and some dropped by each test.
TINY_PANOPTIC = ["MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "0.15",
                 "MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD", "0.5"]
TINY_MP = ["MODEL.MP.NUM_QUERIES", "8"]
TINY_PFT = [
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
    "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.NHEADS", "4", "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64",
    "MODEL.MASK_FORMER.DEC_LAYERS", "3",
]
TINY_SEGVIT = ["MODEL.VIT.EMBED_DIM", "32", "MODEL.VIT.NUM_HEADS", "2", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
               "MODEL.ATM.EMBED_DIM", "32", "MODEL.ATM.NUM_HEADS", "4"]
TINY_SHRUNK = [
    "MODEL.VIT.EMBED_DIM", "32", "MODEL.VIT.NUM_HEADS", "2", "MODEL.VIT.DEPTH", "3", "MODEL.VIT.PRETRAIN_IMG_SIZE", "64",
    "MODEL.VIT.OUT_BLOCKS", "[1, 3]", "MODEL.SEM_SEG_HEAD.IN_FEATURES", "['blk1', 'blk3']",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "6",
    "MODEL.ATM.EMBED_DIM", "32", "MODEL.ATM.NUM_HEADS", "4",
    "MODEL.SHRUNK.QD_BLOCK", "1", "MODEL.SHRUNK.QU_LAYERS_PER_STAGE", "1", "MODEL.SHRUNK.ATM_LAYERS", "2",
    "INPUT.CROP.SIZE", "(64, 64)", "TEST.SLIDE_CROP", "64", "TEST.SLIDE_STRIDE", "48",
]
TINY_SWIN = ["MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.NUM_HEADS", "[1, 1, 2, 2]"]

TOY_SEM = CONFIGS / "toy" / "semantic-segmentation"
TOY_PAN = CONFIGS / "toy" / "panoptic-segmentation"
TOY_INS = CONFIGS / "toy" / "instance-segmentation"
ADE_SEGVIT = CONFIGS / "ade20k" / "semantic-segmentation" / "segvit"


@dataclass(frozen=True)
class Case:
    """One decoder x task: ``config`` (a file under configs/) merged, then ``opts``."""

    name: str
    config: Path
    opts: Tuple[str, ...]
    task: str  # "semantic", "panoptic" or "instance": which outputs inference must produce
    eval_images: Tuple = EVAL_IMAGES
    # Weight seed, chosen so that the untrained model is not degenerate (check_not_degenerate)
    model_seed: int = MODEL_SEED
    expects: Dict[str, str] = field(default_factory=dict)  # built component class names (guards the config)


def _case(name, config, opts, task, eval_images=EVAL_IMAGES, model_seed=MODEL_SEED, **expects):
    return Case(name, config, tuple(opts), task, eval_images, model_seed, dict(expects))


M2F = "MultiScaleMaskedTransformerDecoder"
MP = "MPMaskedTransformerDecoder"
CASES: List[Case] = [
    _case("mask2former_semantic", TOY_SEM / "maskformer2_R18_toy.yaml", TINY_M2F_HEAD, "semantic",
          decoder=M2F, pixel_decoder="MSDeformAttnPixelDecoder"),
    _case("mask2former_panoptic", TOY_PAN / "maskformer2_R18_toy.yaml", TINY_M2F_HEAD + TINY_PANOPTIC, "panoptic",
          decoder=M2F, pixel_decoder="MSDeformAttnPixelDecoder"),
    _case("mask2former_instance", TOY_INS / "maskformer2_R18_toy.yaml", TINY_M2F_HEAD, "instance",
          decoder=M2F, pixel_decoder="MSDeformAttnPixelDecoder"),
    _case("mask2former_fpn_semantic", TOY_SEM / "maskformer2_R18_toy.yaml",
          TINY_M2F_HEAD + ["MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "BasePixelDecoder"], "semantic",
          decoder=M2F, pixel_decoder="BasePixelDecoder"),
    _case("mp_former_semantic", TOY_SEM / "mpformer_R18_toy.yaml", TINY_M2F_HEAD + TINY_MP, "semantic", decoder=MP),
    _case("mp_former_panoptic", TOY_PAN / "mpformer_R18_toy.yaml", TINY_M2F_HEAD + TINY_MP + TINY_PANOPTIC,
          "panoptic", decoder=MP),
    _case("mp_former_instance", TOY_INS / "mpformer_R18_toy.yaml", TINY_M2F_HEAD + TINY_MP, "instance", decoder=MP),
    # The official fork's decoder name (no positional queries).
    _case("mp_former_maskdn_instance", TOY_INS / "mpformer_R18_toy.yaml",
          TINY_M2F_HEAD + TINY_MP + ["MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME",
                                     "MultiScaleMaskedTransformerDecoderMaskDN"], "instance",
          decoder="MultiScaleMaskedTransformerDecoderMaskDN"),
    _case("faseg_semantic", TOY_SEM / "faseg_R18_toy.yaml", TINY_M2F_HEAD, "semantic",
          decoder="FASegTransformerDecoder", pixel_decoder="MSDeformAttnPixelDecoder4Scales"),
    # The official FASeg names (first-layer DFPQ pools the background).
    _case("faseg_official_names_semantic", TOY_SEM / "faseg_R18_toy.yaml",
          TINY_M2F_HEAD + ["MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", "MultiScaleMaskedTransformerDecoderFASeg",
                           "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "MSDeformAttnPixelDecoder4ScalesFASeg"],
          "semantic", decoder="MultiScaleMaskedTransformerDecoderFASeg",
          pixel_decoder="MSDeformAttnPixelDecoder4ScalesFASeg"),
    _case("pft_semantic", TOY_SEM / "pft_R18_toy.yaml", TINY_PFT, "semantic",
          decoder="PyramidFusionTransformerDecoder", pixel_decoder="BasePixelDecoder"),
    _case("segvit_atm_semantic", TOY_SEM / "segvit_tiny_toy.yaml", TINY_SEGVIT, "semantic",
          decoder="ATMDecoder", pixel_decoder="IdentityPixelDecoder"),
    # No toy config: the ADE20K one, shrunk; its inference is sliding-window (TEST.SLIDING_WINDOW), so the
    # second image (80 x 96) is covered by 2 x 3 windows of the 64 x 64 crop the QU grid is built for.
    _case("segvit_shrunk_semantic", ADE_SEGVIT / "segvit_shrunk_vit_base_bs16_160k.yaml", TINY_SHRUNK, "semantic",
          eval_images=(((64, 64), (32, 32)), ((80, 96), (40, 48))),
          decoder="ATMShrunkDecoder", pixel_decoder="IdentityPixelDecoder", backbone="D2ShrunkViT"),
    _case("semask_semantic", TOY_SEM / "maskformer2_semask_swin_toy.yaml", TINY_M2F_HEAD + TINY_SWIN, "semantic",
          decoder=M2F, backbone="D2SeMaskSwinTransformer"),
]
CASES_BY_NAME = {c.name: c for c in CASES}
assert len(CASES_BY_NAME) == len(CASES), "case names must be unique"


def recording_path(case: Case) -> Path:
    return RECORDED_DIR / f"{case.name}.pt"


def build_cfg(case: Case):
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.merge_from_file(str(case.config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *case.opts])
    cfg.freeze()
    return cfg


def _weight_names(model: nn.Module, types) -> set:
    return {f"{name}.weight" if name else "weight" for name, m in model.named_modules() if isinstance(m, types)}


def reinit_by_name(model: nn.Module, seed: int = MODEL_SEED) -> None:
    """Redraw every parameter from a generator seeded by ``seed`` and the parameter's name: tensors of 2+ dims
    ~ U(-g/sqrt(fan_in), g/sqrt(fan_in)), g = ``WEIGHT_GAIN``, embeddings ~ U(-e, e), norm scales ~ 1 + U(-b, b),
    other 1-D parameters ~ U(-b, b), b = ``ONE_D_BOUND``. The values depend on names and shapes only."""
    norm_weights = _weight_names(model, NORM_TYPES)
    embeddings = _weight_names(model, nn.Embedding)
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))  # mt19937 keeps 32 bits
            if name in embeddings:
                values = torch.empty(p.shape, dtype=torch.float64).uniform_(-EMBEDDING_BOUND, EMBEDDING_BOUND,
                                                                            generator=g)
            elif p.dim() >= 2:
                bound = WEIGHT_GAIN / math.sqrt(p[0].numel())
                values = torch.empty(p.shape, dtype=torch.float64).uniform_(-bound, bound, generator=g)
            else:
                values = torch.empty(p.shape, dtype=torch.float64).uniform_(-ONE_D_BOUND, ONE_D_BOUND, generator=g)
                if name in norm_weights:
                    values += 1.0
            p.copy_(values.to(p.dtype))


def build_case_model(case: Case) -> nn.Module:
    """The case's model: seeded build, then name-keyed weights (see the module docstring)."""
    cfg = build_cfg(case)
    torch.manual_seed(case.model_seed)
    model = build_model(cfg)
    reinit_by_name(model, case.model_seed)
    return model


def component_names(model: nn.Module) -> Dict[str, str]:
    """Class names of the built backbone, pixel decoder and transformer decoder."""
    head = model.sem_seg_head
    return {
        "backbone": type(model.backbone).__name__,
        "pixel_decoder": type(head.pixel_decoder).__name__,
        "decoder": type(head.predictor).__name__,
    }


def eval_inputs(case: Case, num_classes: int) -> List[Dict]:
    inputs = []
    for i, ((h, w), (out_h, out_w)) in enumerate(case.eval_images):
        (item,) = generated_batch(1, h, w, num_classes, with_targets=False, seed=EVAL_INPUT_SEED + 100 * i)
        item.update(height=out_h, width=out_w)
        inputs.append(item)
    return inputs


def train_inputs(model: nn.Module, num_classes: int) -> List[Dict]:
    return generated_batch(TRAIN_BATCH_SIZE, *TRAIN_SIZE, num_classes, with_targets=True,
                           semantic=needs_semantic_targets(model), seed=TRAIN_INPUT_SEED)


SEGMENTS_INFO = "segments_info"  # a list of dicts kept whole (compared with ==)


def flatten(obj, prefix: str) -> Dict[str, object]:
    """Nested dicts / lists / tuples of tensors and Python values -> {"a.0.b": leaf}."""
    if isinstance(obj, dict):
        out = {}
        for k in sorted(obj, key=str):
            out.update(flatten(obj[k], f"{prefix}.{k}"))
        return out
    if isinstance(obj, (list, tuple)) and not prefix.endswith(SEGMENTS_INFO):
        out = {f"{prefix}.len": len(obj)}
        for i, x in enumerate(obj):
            out.update(flatten(x, f"{prefix}.{i}"))
        return out
    if isinstance(obj, Tensor):
        return {prefix: obj.detach().clone()}
    return {prefix: obj}  # scalars, None, segments_info


def _instances_dict(inst: Instances) -> Dict:
    return {
        "image_size": tuple(inst.image_size),
        "pred_masks": inst.pred_masks.bool(),  # {0, 1} floats: stored as bool, compared exactly
        "pred_boxes": inst.pred_boxes.tensor,
        "scores": inst.scores,
        "pred_classes": inst.pred_classes,
    }


def _result_dict(result: Dict) -> Dict:
    out = {}
    if "sem_seg" in result:
        out["sem_seg"] = result["sem_seg"]
    if "panoptic_seg" in result:
        ids, segments_info = result["panoptic_seg"]
        out["panoptic_seg"] = ids
        out[SEGMENTS_INFO] = [dict(s) for s in segments_info]
    if "instances" in result:
        out["instances"] = _instances_dict(result["instances"])
    return out


def _inference_record(model: nn.Module, case: Case, num_classes: int) -> Dict[str, object]:
    inputs = eval_inputs(case, num_classes)
    # Raw head outputs on a batch the decoder takes whole: with sliding-window inference (the Shrunk QU grid is
    # fixed by the crop) only the first image, which has the crop size.
    head_inputs = inputs[:1] if model.sliding_window else inputs
    model.eval()
    with torch.no_grad():
        images = model.preprocess_image(head_inputs)
        head = model.sem_seg_head(model.backbone(images.tensor))
        results = model(inputs)
    record = flatten(head, "head")
    for i, result in enumerate(results):
        record.update(flatten(_result_dict(result), f"result.{i}"))
    return record


def _training_record(model: nn.Module, num_classes: int) -> Dict[str, object]:
    batch = train_inputs(model, num_classes)
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(FORWARD_SEED)
        with EventStorage(0):  # iteration 0 (PFT's attention-loss schedule reads it)
            losses = model(batch)
        sum(losses.values()).backward()
    # Scalars as Python floats (exact for the float32 losses; the norms are computed in float64).
    record = {f"loss.{k}": float(v.detach()) for k, v in sorted(losses.items())}
    for name, p in sorted(model.named_parameters()):
        grad = p.grad
        record[f"grad_norm.{name}"] = None if grad is None else float(grad.double().norm())
        small = p.numel() <= FULL_GRAD_MAX_NUMEL and name.startswith("sem_seg_head.predictor.")
        if grad is not None and small and any(s in name for s in FULL_GRAD_PATTERN):
            record[f"grad.{name}"] = grad.clone()
    model.zero_grad(set_to_none=True)
    model.eval()
    return record


def run_case(case: Case) -> Dict[str, object]:
    """Build the case's model and return its flat record (inference first, on the freshly built model: the
    training forward updates BatchNorm statistics)."""
    model = build_case_model(case)
    num_classes = model.sem_seg_head.num_classes
    record = {f"component.{k}": v for k, v in component_names(model).items()}
    record.update(_inference_record(model, case, num_classes))
    record.update(_training_record(model, num_classes))
    return record


# ---- what a useful recording looks like ----

def _task_keys(case: Case) -> List[str]:
    return {"semantic": ["sem_seg"], "panoptic": ["sem_seg", "panoptic_seg", "segments_info"],
            "instance": ["instances.pred_masks"]}[case.task]


def check_not_degenerate(case: Case, record: Dict[str, object]) -> List[str]:
    """Problems that would make the recording a weak reference (empty list: none)."""
    problems = []
    for key, value in case.expects.items():
        if record.get(f"component.{key}") != value:
            problems.append(f"built {key} is {record.get(f'component.{key}')!r}, expected {value!r}")
    masks = record["head.pred_masks"]
    if not ((masks > 0).any() and (masks < 0).any()):
        problems.append("head.pred_masks has a single sign")
    per_query = masks.flatten(2)  # B x Q x HW
    spread = (per_query - per_query.mean(1, keepdim=True)).abs().amax()
    if spread < 1e-3 * masks.abs().amax():
        problems.append("all queries predict the same mask")
    logits = record["head.pred_logits"]
    finite = logits[torch.isfinite(logits)]
    if finite.numel() == 0 or finite.std() < 1e-4:
        problems.append("head.pred_logits are constant")
    for i in range(len(case.eval_images)):
        for key in _task_keys(case):
            if f"result.{i}.{key}" not in record:
                problems.append(f"result.{i}.{key} missing for a {case.task} case")
        sem = record.get(f"result.{i}.sem_seg")
        # An untrained decoder often gives every query the same class distribution, so the argmax is one class
        # (FASeg, ATM here); the scores must still vary over the pixels for the comparison to mean something.
        if sem is not None and (sem - sem.mean((1, 2), keepdim=True)).abs().amax() < 1e-3 * sem.abs().amax():
            problems.append(f"result.{i}.sem_seg scores are constant over the pixels")
        segments = record.get(f"result.{i}.segments_info")
        if segments is not None:
            ids = record[f"result.{i}.panoptic_seg"]
            if not segments or not (ids == 0).any() and len(segments) < 2:
                problems.append(f"result.{i}: panoptic output has {len(segments)} segments")
        inst = record.get(f"result.{i}.instances.pred_masks")
        if inst is not None:
            filled = inst.flatten(1).any(1)
            if not filled.any() or filled.all() and inst.flatten(1).all(1).any():
                problems.append(f"result.{i}: instance masks are empty or full")
    losses = {k: v for k, v in record.items() if k.startswith("loss.")}
    if not losses or not all(math.isfinite(v) for v in losses.values()) or sum(losses.values()) <= 0:
        problems.append(f"losses not finite or zero: {losses}")
    zero_losses = [k for k, v in losses.items() if v == 0]
    if zero_losses:
        problems.append(f"loss terms exactly 0: {zero_losses}")
    norms = {k[len("grad_norm."):]: v for k, v in record.items() if k.startswith("grad_norm.")}
    for part in ("backbone.", "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."):
        values = [v for k, v in norms.items() if k.startswith(part) and v is not None]
        if part == "sem_seg_head.pixel_decoder." and not any(k.startswith(part) for k in norms):
            continue  # a parameter-free pixel decoder (IdentityPixelDecoder)
        if not values or max(values) == 0:
            problems.append(f"no gradient reaches {part}*")
    if not any(k.startswith("grad.") for k in record):
        problems.append("no full gradient recorded")
    return problems


def describe(record: Dict[str, object]) -> str:
    """One line of sizes for the recorder's log."""
    tensors = [v for v in record.values() if isinstance(v, Tensor)]
    return f"{len(record)} entries, {sum(t.numel() for t in tensors)} tensor elements"
