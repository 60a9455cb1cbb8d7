"""Start-up config validation: every problem of a config is reported in one error, and the shipped
toy configs have none."""
import glob
import os

import pytest
from detectron2.engine import default_argument_parser

from qsegformers.engine import Trainer, setup
from qsegformers.engine.defaults import get_qsegformers_cfg
from qsegformers.engine.validation import ConfigValidationError, config_problems, validate_config

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TOY = os.path.join(REPO, "configs", "toy")
SEMANTIC = os.path.join(TOY, "semantic-segmentation", "maskformer2_R18_toy.yaml")
INSTANCE = os.path.join(TOY, "instance-segmentation", "maskformer2_R18_toy.yaml")
TOY_CLASSES, TOY_THINGS = 6, 3  # the generated toy data: 3 stuff + 3 thing classes


def _cfg(path, *opts):
    cfg = get_qsegformers_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(TOY, "*", "*.yaml"))))
def test_shipped_toy_configs_are_valid(path):
    assert config_problems(_cfg(path)) == []


def test_all_problems_are_reported_at_once():
    cfg = _cfg(
        SEMANTIC,
        "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "NoSuchPixelDecoder",
        "MODEL.MASK_FORMER.MATCHER_NAME", "NoSuchMatcher",
        "INPUT.DATASET_MAPPER_NAME", "no_such_mapper",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "8",
        "MODEL.SEM_SEG_HEAD.IN_FEATURES", "['res4', 'res5']",
        "MODEL.RESNETS.RES4_DILATION", "2",
    )
    with pytest.raises(ConfigValidationError) as info:
        validate_config(cfg)
    message = str(info.value)
    assert "7 problem(s)" in message  # 3 names, 1 compatibility key, NUM_CLASSES x 2 datasets, levels
    for expected in (
        "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = 'NoSuchPixelDecoder' is not registered",
        "MODEL.MASK_FORMER.MATCHER_NAME = 'NoSuchMatcher' is not registered",
        "INPUT.DATASET_MAPPER_NAME = 'no_such_mapper' is not registered",
        "MODEL.RESNETS.RES4_DILATION = 2",
        "reads 3 multi-scale feature levels",
    ):
        assert expected in message, expected
    # NUM_CLASSES is checked against both the train and the test set
    assert message.count(f"NUM_CLASSES = 8, but dataset") == 2
    assert f"has {TOY_CLASSES} classes in its metadata (stuff_classes)" in message
    assert "HungarianMatcher" in message  # the choices are listed


def test_instance_data_is_checked_against_thing_classes():
    problems = config_problems(_cfg(INSTANCE, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(TOY_CLASSES)))
    assert len(problems) == 2
    assert all(f"has {TOY_THINGS} classes in its metadata (thing_classes)" in p for p in problems)


def test_fixed_matcher_needs_one_query_per_class_unless_the_decoder_makes_them():
    mask2former = _cfg(SEMANTIC, "MODEL.MASK_FORMER.MATCHER_NAME", "FixedMatcher")
    problems = config_problems(mask2former)
    assert len(problems) == 1 and "NUM_OBJECT_QUERIES = 20 queries for" in problems[0]
    one_per_class = _cfg(SEMANTIC, "MODEL.MASK_FORMER.MATCHER_NAME", "FixedMatcher",
                         "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", str(TOY_CLASSES))
    assert config_problems(one_per_class) == []
    pft = _cfg(os.path.join(TOY, "semantic-segmentation", "pft_R18_toy.yaml"),
               "MODEL.MASK_FORMER.MATCHER_NAME", "FixedMatcher")  # PFT makes one query per class itself
    assert config_problems(pft) == []


def test_setup_and_trainer_validate(tmp_path):
    opts = ["--config-file", SEMANTIC, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "9", "OUTPUT_DIR", str(tmp_path)]
    with pytest.raises(ConfigValidationError, match="NUM_CLASSES = 9"):
        setup(default_argument_parser().parse_args(["--eval-only"] + opts))
    cfg = _cfg(SEMANTIC, "MODEL.META_ARCHITECTURE", "NoSuchArch", "OUTPUT_DIR", str(tmp_path))
    with pytest.raises(ConfigValidationError, match="MODEL.META_ARCHITECTURE = 'NoSuchArch'"):
        Trainer(cfg)
