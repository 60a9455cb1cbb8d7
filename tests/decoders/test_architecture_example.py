"""docs/architecture.md's worked example, run as written in the doc: the decoder that overrides one step of the
Mask2Former loop (``layer_attention_mask``) builds from a toy config through its own config function, runs a
forward and a training loss, and its override decides the masks its first layers attend with."""
import math
import os
import re

import pytest
import torch
from detectron2.modeling import build_model

from qsegformers.engine.defaults import get_qsegformers_cfg
from qsegformers.registries import TRANSFORMER_DECODER_REGISTRY
from qsegformers.utils.benchmark import generated_batch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DOC = os.path.join(REPO, "docs", "architecture.md")
TOY = os.path.join(REPO, "configs", "toy", "semantic-segmentation", "maskformer2_R18_toy.yaml")
EXAMPLE_HEADING = "### Worked example"
TEST_NAME = "_ArchitectureDocExampleDecoder"  # the registry name the example is moved to while this file runs
B, H, W = 2, 64, 64
TINY = [
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1", "MODEL.MASK_FORMER.HIDDEN_DIM", "32",
    "MODEL.MASK_FORMER.NHEADS", "4", "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8", "MODEL.MASK_FORMER.DEC_LAYERS", "4",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256", "MODEL.DEVICE", "cpu",
]


def _example_source() -> str:
    """The first python block after the worked-example heading of docs/architecture.md."""
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    block = re.search(r"```python\n(.*?)```", text[text.index(EXAMPLE_HEADING):], re.S)
    return block.group(1)


@pytest.fixture(scope="module")
def example():
    """The doc's namespace, its decoder re-registered under TEST_NAME (the registry is restored afterwards)."""
    namespace = {"__name__": "architecture_example"}
    exec(compile(_example_source(), DOC, "exec"), namespace)
    decoder_cls = namespace["UnmaskedFirstLayersDecoder"]
    registry = TRANSFORMER_DECODER_REGISTRY._obj_map
    assert registry.pop(decoder_cls.__name__) is decoder_cls  # the doc's decorator registered it
    registry[TEST_NAME] = decoder_cls
    yield namespace
    registry.pop(TEST_NAME, None)


def _model(example, unmasked_layers: int):
    cfg = get_qsegformers_cfg()
    example["add_unmasked_config"](cfg)
    cfg.merge_from_file(TOY)
    cfg.merge_from_list(TINY + ["MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", TEST_NAME,
                                "MODEL.UNMASKED.LAYERS", str(unmasked_layers)])
    torch.manual_seed(0)
    return build_model(cfg), cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES


def _train_step(model, num_classes):
    """Weighted losses of one training forward, and the cross-attention mask each layer received."""
    masks = {}
    for i, layer in enumerate(model.sem_seg_head.predictor.transformer_cross_attention_layers):
        layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: masks.__setitem__(i, kwargs["memory_mask"].clone()), with_kwargs=True
        )
    model.train()
    losses = model(generated_batch(B, H, W, num_classes, with_targets=True, seed=0))
    return losses, masks


def test_example_builds_from_its_config_function(example):
    model, num_classes = _model(example, unmasked_layers=2)
    predictor = model.sem_seg_head.predictor
    assert type(predictor) is example["UnmaskedFirstLayersDecoder"] and predictor.unmasked_layers == 2
    assert type(model.criterion).__name__ == "SetCriterion"  # inherited criterion_name
    model.eval()
    with torch.no_grad():
        images = model.preprocess_image(generated_batch(B, H, W, num_classes, with_targets=False, seed=1))
        out = model.sem_seg_head(model.backbone(images.tensor))
    assert out["pred_logits"].shape == (B, 8, num_classes + 1)
    assert out["pred_masks"].shape == (B, 8, H // 4, W // 4)
    assert len(out["aux_outputs"]) == 3  # DEC_LAYERS = 4 predictions


def test_overridden_step_opens_the_first_layers_and_trains(example):
    model, num_classes = _model(example, unmasked_layers=1)
    losses, masks = _train_step(model, num_classes)
    assert {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_dice_2"} <= set(losses)
    assert all(math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()
    assert model.sem_seg_head.predictor.class_embed.weight.grad.abs().sum() > 0
    assert not masks[0].any()  # layer 0: the example's step blocked nothing
    assert masks[1].any() and masks[2].any()  # later layers: the base's predicted-mask masks
    # With LAYERS = 0 the same weights give layer 0 the base's mask: the override, not the model, opened it.
    base_model, _ = _model(example, unmasked_layers=0)
    _, base_masks = _train_step(base_model, num_classes)
    assert base_masks[0].any()
