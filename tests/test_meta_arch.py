"""MaskFormer meta-architecture: training losses, gradients and the three inference outputs."""
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances

import qsegformers  # noqa: F401
from qsegformers import add_qsegformers_config

pytestmark = pytest.mark.smoke  # also run on the current stack (.ci/run)

TOY_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "toy", "Base-Toy.yaml")
NUM_CLASSES = 6
THING_IDS = {3, 4, 5}
DATASET = "qseg_test_meta_arch"


@pytest.fixture(scope="module")
def cfg():
    MetadataCatalog.get(DATASET).set(thing_dataset_id_to_contiguous_id={10 + i: i for i in THING_IDS})
    c = get_cfg()
    add_qsegformers_config(c)
    c.merge_from_file(TOY_CONFIG)
    c.MODEL.DEVICE = "cpu"
    c.DATASETS.TRAIN = (DATASET,)
    c.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 64
    c.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    c.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True
    c.MODEL.MASK_FORMER.TEST.INSTANCE_ON = True
    c.TEST.DETECTIONS_PER_IMAGE = 7
    return c


def batch(h=60, w=70, with_targets=True):
    torch.manual_seed(0)
    out = []
    for _ in range(2):
        d = {"image": torch.randint(0, 256, (3, h, w)).float(), "height": 2 * h, "width": 2 * w}
        if with_targets:
            inst = Instances((h, w))
            masks = torch.zeros(2, h, w, dtype=torch.bool)
            masks[0, : h // 2] = True
            masks[1, h // 2 :] = True
            inst.gt_masks = BitMasks(masks)
            inst.gt_classes = torch.tensor([0, 4])
            d["instances"] = inst
        out.append(d)
    return out


def test_training_returns_weighted_losses_with_gradients(cfg):
    torch.manual_seed(0)
    model = build_model(cfg).train()
    losses = model(batch())
    dec_layers = cfg.MODEL.MASK_FORMER.DEC_LAYERS
    expected = {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in [""] + [f"_{i}" for i in range(dec_layers - 1)]}
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.sem_seg_head.predictor.query_feat.weight.grad.abs().sum() > 0
    assert model.backbone.stem.conv1.weight.grad.abs().sum() > 0
    # the class loss is weighted by CLASS_WEIGHT (2.0): its unweighted value is half
    assert model.criterion.weight_dict["loss_ce"] == cfg.MODEL.MASK_FORMER.CLASS_WEIGHT


def test_inference_outputs_all_three_tasks_at_the_requested_size(cfg):
    model = build_model(cfg).eval()
    with torch.no_grad():
        results = model(batch(with_targets=False))
    assert len(results) == 2
    for r in results:
        assert r["sem_seg"].shape == (NUM_CLASSES, 120, 140)
        pan, segments = r["panoptic_seg"]
        assert pan.shape == (120, 140)
        assert {s["id"] for s in segments} <= set(pan.unique().tolist()) | {0}
        inst = r["instances"]
        assert inst.image_size == (120, 140) and len(inst) <= 7
        assert inst.pred_masks.shape[1:] == (120, 140)
        # with panoptic on, instances are things only
        assert set(inst.pred_classes.tolist()) <= THING_IDS


def test_sem_seg_probabilities_are_a_mixture_of_query_masks(cfg):
    """sem_seg equals softmax class probs (without no-object) x sigmoid masks, summed over queries."""
    c = cfg.clone()
    c.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = False
    c.MODEL.MASK_FORMER.TEST.INSTANCE_ON = False
    model = build_model(c).eval()
    inputs = [{"image": torch.rand(3, 64, 64) * 255}]
    with torch.no_grad():
        sem = model(inputs)[0]["sem_seg"]
        images = model.preprocess_image(inputs)
        out = model.sem_seg_head(model.backbone(images.tensor))
    probs = out["pred_logits"][0].softmax(-1)[:, :-1]
    masks = torch.nn.functional.interpolate(out["pred_masks"], size=(64, 64), mode="bilinear", align_corners=False)
    expected = torch.einsum("qc,qhw->chw", probs, masks[0].sigmoid())
    torch.testing.assert_close(sem, expected, rtol=1e-4, atol=1e-5)


def test_training_without_instances_is_a_clear_error(cfg):
    model = build_model(cfg).train()
    with pytest.raises(ValueError, match="instances"):
        model(batch(with_targets=False))


def test_unknown_decoder_name_is_a_clear_error(cfg):
    c = cfg.clone()
    c.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "NoSuchDecoder"
    with pytest.raises(KeyError, match="TRANSFORMER_DECODER_NAME.*MultiScaleMaskedTransformerDecoder"):
        build_model(c)


@pytest.mark.parametrize("key,value", [
    ("MODEL.RESNETS.RES5_MULTI_GRID", [1, 2, 4]),
    ("MODEL.MASK_FORMER.ENC_LAYERS", 6),
    ("MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", 128),
])
def test_compat_only_key_with_unsupported_value_is_a_clear_error(cfg, key, value):
    c = cfg.clone()
    c.merge_from_list([key, value])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_model(c)
