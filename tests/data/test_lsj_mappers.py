"""COCO large-scale-jitter mappers: fixed IMAGE_SIZE output, padding that never becomes a class."""
import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T

from qsegformers.data.datasets.toy import generate_toy_dataset, register_toy_datasets
from qsegformers.data.mappers import COCOInstanceLSJDatasetMapper, COCOPanopticLSJDatasetMapper
from qsegformers.data.mappers.build import build_dataset_mapper

from test_mappers import _cfg, _check_common

IMAGE_SIZE = 160  # larger than the 128 x 128 toy images: small scales need padding
IGNORE = 255


@pytest.fixture(scope="module")
def toy_registered(tmp_path_factory):
    root = generate_toy_dataset(str(tmp_path_factory.mktemp("toy") / "qseg_toy"), 4, 1)
    register_toy_datasets(root, 4, 1)
    yield root
    register_toy_datasets()


def lsj_cfg(mapper_name, dataset):
    return _cfg(mapper_name, dataset, IMAGE_SIZE=IMAGE_SIZE, MIN_SCALE=0.5, MAX_SCALE=1.5, SIZE_DIVISIBILITY=-1)


@pytest.mark.parametrize("mapper_name,dataset,cls", [
    ("coco_panoptic_lsj", "qseg_toy_panoptic_train", COCOPanopticLSJDatasetMapper),
    ("coco_instance_lsj", "qseg_toy_instance_train", COCOInstanceLSJDatasetMapper),
])
def test_lsj_outputs_are_image_size_squares(toy_registered, mapper_name, dataset, cls):
    np.random.seed(0)
    mapper = build_dataset_mapper(lsj_cfg(mapper_name, dataset), is_train=True)
    assert type(mapper) is cls
    types = [type(a) for a in mapper.augmentations.augs]
    assert types == [T.RandomFlip, T.ResizeScale, T.FixedSizeCrop]
    for d in DatasetCatalog.get(dataset):
        out = mapper(d)
        _check_common(out, with_sem_seg=mapper_name == "coco_panoptic_lsj")
        assert tuple(out["image"].shape[-2:]) == (IMAGE_SIZE, IMAGE_SIZE)


def test_lsj_padding_is_ignore_not_class_zero(toy_registered):
    """At the smallest scale the 128 px image becomes 80 px: the rest is padding, labelled ignore and
    covered by no target mask."""
    cfg = lsj_cfg("coco_panoptic_lsj", "qseg_toy_panoptic_train")
    cfg.INPUT.MIN_SCALE = cfg.INPUT.MAX_SCALE = 0.5
    cfg.INPUT.RANDOM_FLIP = "none"
    mapper = build_dataset_mapper(cfg, is_train=True)
    out = mapper(DatasetCatalog.get("qseg_toy_panoptic_train")[0])
    scaled = int(IMAGE_SIZE * 0.5)
    sem = out["sem_seg"]
    assert bool((sem[scaled:, :] == IGNORE).all()) and bool((sem[:, scaled:] == IGNORE).all())
    assert bool((sem[:scaled, :scaled] != IGNORE).any())
    masks = out["instances"].gt_masks
    assert not bool(masks[:, scaled:, :].any()) and not bool(masks[:, :, scaled:].any())
    assert bool((out["image"][:, scaled:, :] == 128).all())
    # every labelled pixel of the resized image is covered by the mask of its own class
    for cls, mask in zip(out["instances"].gt_classes.tolist(), masks):
        assert bool((sem[mask] == cls).all())
    assert not bool(((sem != IGNORE) & ~masks.any(0)).any())
