"""Our Mask2Former reproduces the official one: a tiny model built from the official merged config, unchanged,
with the official weights, compared with what the original code produced (tests/reference/
official_mask2former_tiny/, see its README): head outputs of every layer, semantic/panoptic/instance results
(incl. an image resized to a given height/width), crafted post-processing inputs reaching every branch, and
one seeded training step (12 losses, 4 full gradients).
"""
import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Instances

from qsegformers import add_qsegformers_config
from qsegformers.inference import QueryPostprocessing

GOLDEN_DIR = Path(__file__).resolve().parent / "reference" / "official_mask2former_tiny"
EVAL_CASES = ("A", "AB")  # eval_A.pt: one 64x64 image; eval_AB.pt: + a 72x56 image resized to 90x70

# Tolerances: the official model and ours run the same float32 ops in a different order, so continuous
# outputs agree to rounding error; each bound is >= 5x the largest error observed (CPU, 1 thread).
# Class and mask logits of every layer (|logits| <= 26, |mask logits| <= 9): observed 9.5e-6.
HEAD_ATOL = 5e-5
# Semantic scores (<= 2): observed 1.7e-6 (model), 2.4e-7 (crafted inputs).
SEM_SEG_ATOL = 1e-5
# Instance scores (class prob x mean mask prob, <= 1): observed 6.0e-7 (model), 0 (crafted inputs).
INSTANCE_SCORE_ATOL = 1e-5
# Weighted losses (loss_ce ~ 20, the mask terms ~ 3): observed 1.9e-6.
LOSS_ATOL = 2e-5
# Gradients, max |ours - official| over max |official| per parameter: observed 5.3e-6 (patch embedding).
GRAD_RTOL = 1e-4
# Discrete outputs (binary masks, panoptic ids, classes, segments) are compared exactly: the smallest
# |mask logit| at output size (4.7e-5), the smallest panoptic score gap (2.3e-4) and the class-score gap at
# the top-k cut (4.3e-5) are all >= 6x the largest observed logit error (7.6e-6), so no decision sits
# within rounding error of its threshold.


def _load(name: str):
    return torch.load(GOLDEN_DIR / name, weights_only=False)


@pytest.fixture(scope="module")
def manifest():
    return json.loads((GOLDEN_DIR / "manifest.json").read_text())


@pytest.fixture(scope="module")
def model(manifest):
    """The official config.yaml merged unchanged, the metadata of its README, the weights loaded strict."""
    meta = manifest["metadata"]
    MetadataCatalog.get(meta["name"]).set(
        thing_classes=meta["thing_classes"],
        stuff_classes=meta["stuff_classes"],
        thing_dataset_id_to_contiguous_id={int(k): v for k, v in meta["thing_dataset_id_to_contiguous_id"].items()},
        stuff_dataset_id_to_contiguous_id={int(k): v for k, v in meta["stuff_dataset_id_to_contiguous_id"].items()},
    )
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.merge_from_file(str(GOLDEN_DIR / "config.yaml"))
    model = build_model(cfg)
    official = _load("weights_fp16.pt")
    # Buffers are constants of the config (e.g. the no-object class weight), kept from before the load.
    model.built_buffers = {name: b.clone() for name, b in model.named_buffers() if name in official}
    weights = {k: v.float() if v.is_floating_point() else v for k, v in official.items()}
    model.load_result = model.load_state_dict(weights, strict=True)
    model.official_state_dict = official
    model.golden_cfg = cfg
    return model


@pytest.fixture(scope="module", params=EVAL_CASES)
def eval_case(request, model):
    """(golden dict, our head outputs, our per-image results) of one eval case."""
    golden = _load(f"eval_{request.param}.pt")
    model.eval()
    with torch.no_grad():
        images = model.preprocess_image(golden["inputs"])
        head = model.sem_seg_head(model.backbone(images.tensor))
        results = model(golden["inputs"])
    return golden, head, results


@pytest.fixture(scope="module")
def train_step(model):
    """(golden dict, our weighted losses, our gradients by parameter name) of the seeded training step."""
    golden = _load("train_step.pt")
    inputs = []
    for target in golden["targets"]:
        instances = Instances(tuple(target["image"].shape[-2:]))
        instances.gt_classes = target["gt_classes"]
        instances.gt_masks = target["gt_masks"]
        inputs.append({"image": target["image"], "instances": instances})
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]):  # leave the global RNG of later tests untouched
        torch.manual_seed(golden["seed_before_forward"])
        losses = model(inputs)
    sum(losses.values()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if name in golden["grads"]}
    model.zero_grad(set_to_none=True)
    model.eval()
    return golden, {k: v.detach() for k, v in losses.items()}, grads


def _boxes_of_masks(masks: torch.Tensor) -> torch.Tensor:
    """N x H x W binary masks -> N x 4 (x0, y0, x1, y1) pixel-edge boxes (zeros for an empty mask), via numpy."""
    boxes = np.zeros((masks.shape[0], 4), dtype=np.float32)
    for i, mask in enumerate(masks.bool().numpy()):
        ys, xs = np.nonzero(mask)
        if xs.size:
            boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return torch.from_numpy(boxes)


def _instance_groups(masks: torch.Tensor, classes: torch.Tensor, scores: torch.Tensor):
    """Order-free view of instances: (class, binary mask bytes) -> sorted scores. The official code takes the
    top-k unsorted, ours sorted by class score, so the same instances come in a different order."""
    groups = defaultdict(list)
    for mask, cls, score in zip(masks.bool(), classes.tolist(), scores.tolist()):
        groups[(cls, mask.numpy().tobytes())].append(score)
    return {key: sorted(values) for key, values in groups.items()}


def _assert_instances_match(ours: Instances, golden: dict):
    assert tuple(ours.image_size) == tuple(golden["image_size"])
    assert len(ours) == golden["pred_masks"].shape[0]
    assert ((ours.pred_masks == 0) | (ours.pred_masks == 1)).all()
    mine = _instance_groups(ours.pred_masks, ours.pred_classes, ours.scores)
    theirs = _instance_groups(golden["pred_masks"], golden["pred_classes"], golden["scores"])
    assert mine.keys() == theirs.keys(), (
        f"(class, mask) pairs differ: ours {sorted(c for c, _ in mine)}, official {sorted(c for c, _ in theirs)}"
    )
    for key, scores in theirs.items():
        torch.testing.assert_close(torch.tensor(mine[key]), torch.tensor(scores), atol=INSTANCE_SCORE_ATOL, rtol=0)
    # The official boxes are zero placeholders; ours must be the boxes of the masks.
    assert torch.equal(ours.pred_boxes.tensor, _boxes_of_masks(ours.pred_masks))


def test_golden_files_match_manifest(manifest):
    for name, entry in manifest["files"].items():
        data = (GOLDEN_DIR / name).read_bytes()
        assert len(data) == entry["bytes"], name
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name


def test_official_config_builds_the_official_model(model, manifest):
    """Strict load of the official weights; the inference settings the official model read from the same file."""
    assert not model.load_result.missing_keys and not model.load_result.unexpected_keys
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    # The buffers our config built (no-object weight, Swin relative position index) are the official ones
    # (float buffers as the file stores them: rounded to fp16).
    assert sorted(model.built_buffers) == [
        "backbone.layers.0.blocks.0.attn.relative_position_index",
        "backbone.layers.1.blocks.0.attn.relative_position_index",
        "backbone.layers.2.blocks.0.attn.relative_position_index",
        "backbone.layers.3.blocks.0.attn.relative_position_index",
        "criterion.empty_weight",
    ]
    for name, built in model.built_buffers.items():
        official = model.official_state_dict[name]
        assert torch.equal(built.to(official.dtype), official), name
    # The deformable encoder takes MODEL.MASK_FORMER.NHEADS (4), not the SEM_SEG_HEAD key the dump holds (8).
    attn = model.sem_seg_head.pixel_decoder.transformer.encoder.layers[0].self_attn
    assert (attn.n_heads, attn.n_points) == (model.golden_cfg.MODEL.MASK_FORMER.NHEADS, 4) == (4, 4)
    settings = manifest["settings"]
    post = model.query_postprocessing()
    assert post.object_mask_threshold == pytest.approx(settings["object_mask_threshold"])
    assert post.overlap_threshold == pytest.approx(settings["overlap_threshold"])
    assert post.topk == settings["test_topk_per_image"]
    assert post.num_classes == settings["num_classes"]
    assert post.thing_ids == set(settings["thing_contiguous_ids"])
    assert (post.panoptic_on, model.semantic_on, model.instance_on) == (
        settings["panoptic_on"], settings["semantic_on"], settings["instance_on"])
    assert model.num_queries == settings["num_queries"]
    assert model.size_divisibility == settings["size_divisibility"]
    assert model.sem_seg_postprocess_before_inference == settings["sem_seg_postprocess_before_inference"]
    torch.testing.assert_close(model.pixel_mean.flatten(), torch.tensor(settings["pixel_mean"]), atol=0, rtol=0)
    torch.testing.assert_close(model.pixel_std.flatten(), torch.tensor(settings["pixel_std"]), atol=0, rtol=0)


def test_head_outputs_of_every_layer(eval_case):
    golden, head, _ = eval_case
    ref = golden["head"]
    torch.testing.assert_close(head["pred_logits"], ref["pred_logits"], atol=HEAD_ATOL, rtol=0)
    torch.testing.assert_close(head["pred_masks"], ref["pred_masks"], atol=HEAD_ATOL, rtol=0)
    assert len(head["aux_outputs"]) == len(ref["aux_pred_logits"]) == len(ref["aux_pred_masks"])
    for i, aux in enumerate(head["aux_outputs"]):
        torch.testing.assert_close(aux["pred_logits"], ref["aux_pred_logits"][i], atol=HEAD_ATOL, rtol=0,
                                   msg=lambda m, i=i: f"aux layer {i} logits: {m}")
        torch.testing.assert_close(aux["pred_masks"], ref["aux_pred_masks"][i], atol=HEAD_ATOL, rtol=0,
                                   msg=lambda m, i=i: f"aux layer {i} masks: {m}")


def test_semantic_results(eval_case):
    golden, _, results = eval_case
    assert len(results) == len(golden["results"])
    for ours, ref in zip(results, golden["results"]):
        assert ours["sem_seg"].shape == ref["sem_seg"].shape
        torch.testing.assert_close(ours["sem_seg"], ref["sem_seg"], atol=SEM_SEG_ATOL, rtol=0)


def test_panoptic_results(eval_case):
    golden, _, results = eval_case
    for ours, ref in zip(results, golden["results"]):
        ids, segments = ours["panoptic_seg"]
        ref_ids, ref_segments = ref["panoptic_seg"]
        assert ids.dtype == ref_ids.dtype and torch.equal(ids, ref_ids)
        assert segments == ref_segments


def test_instance_results(eval_case):
    golden, _, results = eval_case
    for ours, ref in zip(results, golden["results"]):
        _assert_instances_match(ours["instances"], ref["instances"])


def test_crafted_postprocessing(manifest):
    """Inputs crafted to reach every branch (two instances of one thing, a stuff class in two merged blobs, a weak
    query, a no-object query, an overlap failure, a hidden mask) through our post-processing API."""
    golden = _load("postproc.pt")
    settings = manifest["settings"]
    post = QueryPostprocessing(
        num_classes=settings["num_classes"],
        activation="softmax",
        object_mask_threshold=settings["object_mask_threshold"],
        overlap_threshold=settings["overlap_threshold"],
        thing_ids=set(settings["thing_contiguous_ids"]),
        topk=settings["test_topk_per_image"],
        panoptic_on=settings["panoptic_on"],
    )
    mask_cls, mask_pred = golden["inputs"]["mask_cls"], golden["inputs"]["mask_pred"]
    ref = golden["outputs"]
    torch.testing.assert_close(post.semantic(mask_cls, mask_pred), ref["semantic_inference"], atol=SEM_SEG_ATOL, rtol=0)
    ids, segments = post.panoptic(mask_cls, mask_pred)
    ref_ids, ref_segments = ref["panoptic_inference"]
    assert torch.equal(ids, ref_ids)
    assert segments == ref_segments
    _assert_instances_match(post.instances(mask_cls, mask_pred), ref["instance_inference"])


def test_training_step_losses(train_step):
    golden, losses, _ = train_step
    assert sorted(losses) == sorted(golden["losses"]) and len(losses) == 12
    for key, value in golden["losses"].items():
        torch.testing.assert_close(losses[key], value, atol=LOSS_ATOL, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
    torch.testing.assert_close(sum(losses.values()), golden["total_loss"], atol=len(losses) * LOSS_ATOL, rtol=0)


def test_training_step_gradients(train_step):
    golden, _, grads = train_step
    assert sorted(grads) == sorted(golden["grads"])
    for name, ref in golden["grads"].items():
        error = (grads[name] - ref).abs().max() / ref.abs().max()
        assert error <= GRAD_RTOL, f"{name}: max error {error:.2e} of max |grad|"
