"""The decoder contract (qsegformers/decoders/base.py): every registered decoder declares its capabilities on
the class, the builder enforces them, and config validation reads the declared level count (PFT included)."""
import os

import pytest
from detectron2.modeling import build_model
from torch import nn

import qsegformers  # noqa: F401  (registers every stage)
from qsegformers.decoders.base import CLASS_ACTIVATIONS, QueryDecoder
from qsegformers.decoders.build import build_transformer_decoder
from qsegformers.engine.defaults import get_qsegformers_cfg
from qsegformers.engine.validation import config_problems
from qsegformers.registries import CRITERION_REGISTRY, MATCHER_REGISTRY, TRANSFORMER_DECODER_REGISTRY

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TOY_DIR = os.path.join(REPO, "configs", "toy", "semantic-segmentation")
PFT_TOY = os.path.join(TOY_DIR, "pft_R18_toy.yaml")
M2F_TOY = os.path.join(TOY_DIR, "maskformer2_R18_toy.yaml")
TEST_NAME = "_ContractTestDecoder"


@pytest.mark.parametrize("name", sorted(name for name, _ in TRANSFORMER_DECODER_REGISTRY))
def test_every_registered_decoder_declares_the_contract(name):
    decoder_cls = TRANSFORMER_DECODER_REGISTRY.get(name)
    assert issubclass(decoder_cls, QueryDecoder)
    assert decoder_cls.class_activation in CLASS_ACTIVATIONS
    assert decoder_cls.matcher_name in MATCHER_REGISTRY
    assert decoder_cls.criterion_name in CRITERION_REGISTRY
    assert isinstance(decoder_cls.queries_are_classes, bool)


def test_declared_capabilities_of_the_methods():
    get = TRANSFORMER_DECODER_REGISTRY.get
    assert get("MultiScaleMaskedTransformerDecoder").num_feature_levels == 3
    assert get("PyramidFusionTransformerDecoder").num_feature_levels == 3
    assert get("PyramidFusionTransformerDecoder").queries_are_classes
    assert not get("MPMaskedTransformerDecoder").queries_are_classes
    assert get("ATMDecoder").num_feature_levels is None  # one stage per feature it is given


@pytest.fixture
def registered():
    """Register classes under TEST_NAME for one test and remove them afterwards."""
    def register(cls):
        TRANSFORMER_DECODER_REGISTRY._obj_map[TEST_NAME] = cls
    yield register
    TRANSFORMER_DECODER_REGISTRY._obj_map.pop(TEST_NAME, None)


def _cfg(name):
    cfg = get_qsegformers_cfg()
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = name
    return cfg


def test_builder_rejects_a_decoder_outside_the_contract(registered):
    class Plain(nn.Module):
        class_activation = "softmax"
        matcher_name = "HungarianMatcher"

    registered(Plain)
    with pytest.raises(TypeError, match="must subclass qsegformers.decoders.base.QueryDecoder"):
        build_transformer_decoder(_cfg(TEST_NAME), 8)

    class NoActivation(QueryDecoder):
        matcher_name = "HungarianMatcher"

    registered(NoActivation)
    with pytest.raises(TypeError, match="must declare class_activation"):
        build_transformer_decoder(_cfg(TEST_NAME), 8)


def test_validation_reads_the_declared_level_count_for_pft():
    """PFT reads 3 levels (num_feature_levels): two IN_FEATURES are reported; the shipped toy config is clean."""
    cfg = get_qsegformers_cfg()
    cfg.merge_from_file(PFT_TOY)
    assert not [p for p in config_problems(cfg) if "feature levels" in p]
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res4", "res5"]
    problems = [p for p in config_problems(cfg) if "feature levels" in p]
    assert len(problems) == 1 and "'PyramidFusionTransformerDecoder' reads 3 multi-scale feature levels" in problems[0]


@pytest.mark.parametrize("path, queries_are_classes", [(PFT_TOY, True), (M2F_TOY, False)])
def test_meta_architecture_inference_reads_the_declared_queries_are_classes(path, queries_are_classes):
    cfg = get_qsegformers_cfg()
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert model.query_postprocessing().queries_are_classes is queries_are_classes
