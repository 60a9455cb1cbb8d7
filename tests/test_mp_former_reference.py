"""The official MP-Former fork's merged configs build our model with exactly the fork's state-dict keys
and shapes (no ``query_embed``, a ``label_enc`` [K, 256]), official checkpoints load strictly, and the
fork's keys mean the same in our config."""
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from qsegformers import add_qsegformers_config
from qsegformers.config import check_unsupported_keys
from qsegformers.decoders.mp_config import mp_options
from qsegformers.decoders.mp_former import MPMaskedTransformerDecoder

from test_reference_state_dict import assert_state_dict_matches, fake_official_state_dict, read_reference

REFERENCES = {"mpformer_coco_ins_r50": 80, "mpformer_coco_pan_r50": 133}


def merged_official(reference_dir, name):
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.merge_from_file(os.path.join(reference_dir, f"{name}_config.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_official_config_builds_the_official_state_dict_and_loads_it(reference_dir, name):
    torch.manual_seed(0)
    model = build_model(merged_official(reference_dir, name))
    predictor = model.sem_seg_head.predictor
    assert isinstance(predictor, MPMaskedTransformerDecoder) and predictor.query_embed is None
    assert predictor.label_enc.weight.shape == (REFERENCES[name], 256)
    assert type(model.criterion).__name__ == "MPCriterion"
    assert_state_dict_matches(model, read_reference(os.path.join(reference_dir, f"{name}_state_dict.tsv")))
    result = model.load_state_dict(fake_official_state_dict(reference_dir, name), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.all(predictor.label_enc.weight == 0.5)


def test_our_decoder_name_with_dropped_query_pos_has_the_official_parameters(reference_dir):
    cfg = merged_official(reference_dir, "mpformer_coco_ins_r50")
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "MPMaskedTransformerDecoder"
    cfg.MODEL.MP.DROP_QUERY_POS = True
    torch.manual_seed(0)
    model = build_model(cfg)
    assert type(model.sem_seg_head.predictor) is MPMaskedTransformerDecoder
    expected = read_reference(os.path.join(reference_dir, "mpformer_coco_ins_r50_state_dict.tsv"))
    assert_state_dict_matches(model, expected)


def test_official_keys_map_onto_mp_options(reference_dir):
    """NUM_DN 5 -> 5 groups; ALL_LY_DN False -> layers 0..3; NOISE_SCALE 0.2 -> point ratio; DN_NO_LB False."""
    cfg = merged_official(reference_dir, "mpformer_coco_ins_r50")
    opts = mp_options(cfg)
    assert (opts["num_groups"], opts["layers"], opts["point_noise_ratio"], opts["cls_loss"]) == (5, 4, 0.2, True)
    assert opts["label_noise_ratio"] == 0.2 and opts["per_head_noise"] is False
    cfg.MODEL.DN.NUM_DN, cfg.MODEL.DN.NOISE_SCALE, cfg.MODEL.MASK_FORMER.ALL_LY_DN = 100, 0.0, True
    opts = mp_options(cfg)
    assert (opts["num_groups"], opts["num_queries"], opts["layers"], opts["point_noise_ratio"]) == (0, 100, -1, 0.0)
    cfg.MODEL.DN.NUM_DN = 0
    assert mp_options(cfg)["enabled"] is False
    cfg.MODEL.MASK_FORMER.DN_MODE = "v6"
    with pytest.raises(ValueError, match="DN_MODE"):
        check_unsupported_keys(cfg)


def test_default_config_uses_the_mp_keys():
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.MODEL.MP.NUM_GROUPS, cfg.MODEL.MP.LAYERS = 3, 2
    opts = mp_options(cfg)
    assert (opts["num_groups"], opts["layers"], opts["point_noise_mode"]) == (3, 2, "uniform_count")
    cfg.MODEL.MP.MASK_NOISE = "blur"
    with pytest.raises(ValueError, match="MODEL.MP.MASK_NOISE"):
        mp_options(cfg)
