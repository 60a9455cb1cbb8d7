"""The three Mask2Former training mappers, on the toy data and on hand-made files."""
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from qsegformers.config import add_qsegformers_config
from qsegformers.data.datasets import generate_toy_dataset, register_toy_datasets
from qsegformers.data.mappers import (
    ColorAugSSDTransform,
    MaskFormerInstanceDatasetMapper,
    MaskFormerPanopticDatasetMapper,
    MaskFormerSemanticDatasetMapper,
    build_dataset_mapper,
)

IGNORE = 255
H, W = 30, 44  # hand-made images: deliberately not multiples of the padding divisor
DIVISOR = 32
PAD_VALUE = 128
MAPPER_DATASETS = [
    ("mask_former_semantic", "qseg_toy_sem_seg_train"),
    ("mask_former_panoptic", "qseg_toy_panoptic_train"),
    ("mask_former_instance", "qseg_toy_instance_train"),
]


@pytest.fixture(scope="module")
def toy_registered(tmp_path_factory):
    root = generate_toy_dataset(str(tmp_path_factory.mktemp("toy") / "qseg_toy"), 4, 1)
    register_toy_datasets(root, 4, 1)
    yield root
    register_toy_datasets()


def _cfg(mapper_name, dataset, **input_overrides):
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.DATASETS.TRAIN = (dataset,)
    cfg.INPUT.DATASET_MAPPER_NAME = mapper_name
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = (96, 128, 160)
    cfg.INPUT.MAX_SIZE_TRAIN = 320
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = (96, 96)
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 0.8
    cfg.INPUT.COLOR_AUG_SSD = True
    cfg.INPUT.SIZE_DIVISIBILITY = 96
    for key, value in input_overrides.items():
        setattr(cfg.INPUT, key, value)
    return cfg


def _check_common(out, with_sem_seg):
    image, inst = out["image"], out["instances"]
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
    shape = tuple(image.shape[-2:])
    assert inst.image_size == shape
    assert inst.gt_classes.dtype == torch.int64 and inst.gt_masks.dtype == torch.bool
    assert inst.gt_masks.shape == (len(inst.gt_classes),) + shape
    assert bool(inst.gt_masks.flatten(1).any(1).all())  # every target mask is non-empty
    if with_sem_seg:
        assert out["sem_seg"].dtype == torch.int64 and tuple(out["sem_seg"].shape) == shape


@pytest.mark.parametrize("mapper_name,dataset", MAPPER_DATASETS)
def test_mappers_on_the_toy_data(toy_registered, mapper_name, dataset):
    np.random.seed(0)
    mapper = build_dataset_mapper(_cfg(mapper_name, dataset), is_train=True)
    for d in DatasetCatalog.get(dataset):
        out = mapper(d)
        _check_common(out, with_sem_seg=mapper_name != "mask_former_instance")
        inst = out["instances"]
        assert tuple(out["image"].shape[-2:]) == (96, 96)
        if mapper_name == "mask_former_semantic":
            present = set(torch.unique(out["sem_seg"]).tolist()) - {IGNORE}
            assert sorted(inst.gt_classes.tolist()) == sorted(present)
        elif mapper_name == "mask_former_panoptic":
            for cls, mask in zip(inst.gt_classes.tolist(), inst.gt_masks):
                assert bool((out["sem_seg"][mask] == cls).all())  # masks and labels stay pixel-aligned
        else:
            assert set(inst.gt_classes.tolist()) <= {0, 1, 2}
            boxes = inst.gt_boxes.tensor
            assert len(boxes) == len(inst) and bool((boxes[:, 2:] > boxes[:, :2]).all())


def test_unknown_mapper_name_names_the_key():
    cfg = _cfg("no_such_mapper", "qseg_toy_sem_seg_train")
    with pytest.raises(KeyError, match="INPUT.DATASET_MAPPER_NAME.*mask_former_panoptic"):
        build_dataset_mapper(cfg)


@pytest.mark.parametrize("cls", [MaskFormerSemanticDatasetMapper, MaskFormerPanopticDatasetMapper,
                                 MaskFormerInstanceDatasetMapper])
def test_mappers_refuse_evaluation(cls):
    with pytest.raises(ValueError, match="only prepares training data"):
        cls(_cfg("mask_former_semantic", "qseg_toy_sem_seg_train"), False)


# ---------------------------------------------------------------- hand-made files


def _save(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def _image(tmp_path, mode="RGB"):
    rgb = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    image = Image.fromarray(rgb).convert(mode)
    path = str(tmp_path / f"image_{mode}.png")
    image.save(path)
    return path


def _halves(left, right, dtype=np.uint8):
    label = np.full((H, W), left, dtype=dtype)
    label[:, W // 2:] = right
    return label


def _semantic(augmentations=(), size_divisibility=0):
    return MaskFormerSemanticDatasetMapper(augmentations=list(augmentations), image_format="RGB",
                                           ignore_label=IGNORE, size_divisibility=size_divisibility)


def _panoptic_dict(tmp_path):
    """Left half segment 5 (class 3), right half segment 7 (class 1), a crowd segment 9 at the top."""
    from panopticapi.utils import id2rgb

    ids = _halves(5, 7, np.uint32)
    ids[:3] = 9
    segments = [{"id": 5, "category_id": 3, "iscrowd": 0}, {"id": 7, "category_id": 1, "iscrowd": 0},
                {"id": 9, "category_id": 2, "iscrowd": 1}]
    return {"file_name": _image(tmp_path), "pan_seg_file_name": _save(tmp_path / "pan.png", id2rgb(ids)),
            "segments_info": segments}


def _instance_dict(tmp_path):
    """A polygon square on the left (class 0) and an RLE block on the right (class 2)."""
    block = np.zeros((H, W), dtype=np.uint8, order="F")
    block[5:25, 30:40] = 1
    rle = mask_util.encode(block)
    rle["counts"] = rle["counts"].decode("ascii")
    annos = [
        {"category_id": 0, "bbox": [4, 4, 12, 12], "bbox_mode": BoxMode.XYWH_ABS, "iscrowd": 0,
         "segmentation": [[4.0, 4.0, 16.0, 4.0, 16.0, 16.0, 4.0, 16.0]]},
        {"category_id": 2, "bbox": [30, 5, 10, 20], "bbox_mode": BoxMode.XYWH_ABS, "iscrowd": 0, "segmentation": rle},
        {"category_id": 1, "bbox": [0, 0, 5, 5], "bbox_mode": BoxMode.XYWH_ABS, "iscrowd": 1,
         "segmentation": [[0.0, 0.0, 5.0, 0.0, 5.0, 5.0]]},
    ]
    return {"file_name": _image(tmp_path), "height": H, "width": W, "annotations": annos}


def _instance_mapper(augmentations=(), size_divisibility=0):
    return MaskFormerInstanceDatasetMapper(augmentations=list(augmentations), image_format="RGB",
                                           size_divisibility=size_divisibility)


def test_semantic_16bit_labels_are_not_clipped(tmp_path):
    label = _halves(0, 300, np.uint16)
    label[0] = IGNORE
    d = {"file_name": _image(tmp_path), "sem_seg_file_name": _save(tmp_path / "l16.png", label)}
    out = _semantic([T.ResizeShortestEdge(2 * H, 4 * W)])(d)
    _check_common(out, with_sem_seg=True)
    assert out["sem_seg"].max() == 300 and out["instances"].gt_classes.tolist() == [0, 300]


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_and_rgba_images_give_three_channels(tmp_path, mode):
    d = {"file_name": _image(tmp_path, mode), "sem_seg_file_name": _save(tmp_path / "l.png", _halves(1, 2))}
    out = _semantic()(d)
    assert tuple(out["image"].shape) == (3, H, W)
    d = dict(_panoptic_dict(tmp_path), file_name=_image(tmp_path, mode))
    assert tuple(_panoptic(d)["image"].shape) == (3, H, W)


def test_size_divisibility_pads_image_labels_and_masks(tmp_path):
    padded = (DIVISOR, 2 * DIVISOR)
    d = {"file_name": _image(tmp_path), "sem_seg_file_name": _save(tmp_path / "l.png", _halves(1, 2))}
    out = _semantic(size_divisibility=DIVISOR)(d)
    _check_common(out, with_sem_seg=True)
    assert tuple(out["image"].shape[-2:]) == padded
    assert bool((out["image"][:, H:] == PAD_VALUE).all()) and bool((out["sem_seg"][:, W:] == IGNORE).all())
    assert not out["instances"].gt_masks[:, H:].any()

    out = MaskFormerPanopticDatasetMapper(augmentations=[], image_format="RGB", ignore_label=IGNORE,
                                          size_divisibility=DIVISOR)(_panoptic_dict(tmp_path))
    _check_common(out, with_sem_seg=True)
    assert tuple(out["sem_seg"].shape) == padded and bool((out["sem_seg"][H:] == IGNORE).all())

    out = _instance_mapper(size_divisibility=DIVISOR)(_instance_dict(tmp_path))
    _check_common(out, with_sem_seg=False)
    assert tuple(out["instances"].gt_masks.shape[-2:]) == padded


def _panoptic(d, augmentations=()):
    return MaskFormerPanopticDatasetMapper(augmentations=list(augmentations), image_format="RGB",
                                           ignore_label=IGNORE, size_divisibility=0)(d)


def test_panoptic_skips_crowd_and_derives_sem_seg(tmp_path):
    out = _panoptic(_panoptic_dict(tmp_path))
    _check_common(out, with_sem_seg=True)
    assert out["instances"].gt_classes.tolist() == [3, 1]
    # Without a sem_seg file the semantic map comes from the segments (crowd included).
    assert out["sem_seg"][0, 0] == 2 and out["sem_seg"][H - 1, 0] == 3 and out["sem_seg"][H - 1, W - 1] == 1


def test_instance_mapper_reads_polygons_and_rle(tmp_path):
    out = _instance_mapper()(_instance_dict(tmp_path))
    _check_common(out, with_sem_seg=False)
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [0, 2]  # the crowd annotation is skipped
    assert inst.gt_masks[1].sum() == 200
    assert inst.gt_boxes.tensor[1].tolist() == [30.0, 5.0, 40.0, 25.0]


def test_crop_that_removes_a_class_drops_its_mask(tmp_path):
    left_half = [T.CropTransform(0, 0, W // 2, H)]
    d = {"file_name": _image(tmp_path), "sem_seg_file_name": _save(tmp_path / "l.png", _halves(1, 2))}
    out = _semantic(left_half)(d)
    assert out["instances"].gt_classes.tolist() == [1] and tuple(out["sem_seg"].shape) == (H, W // 2)
    assert _panoptic(_panoptic_dict(tmp_path), left_half)["instances"].gt_classes.tolist() == [3]
    out = _instance_mapper(left_half)(_instance_dict(tmp_path))
    _check_common(out, with_sem_seg=False)
    assert out["instances"].gt_classes.tolist() == [0]


def test_only_ignore_pixels_give_empty_targets(tmp_path):
    d = {"file_name": _image(tmp_path), "sem_seg_file_name": _save(tmp_path / "l.png", _halves(IGNORE, IGNORE))}
    out = _semantic()(d)
    assert tuple(out["instances"].gt_masks.shape) == (0, H, W) and tuple(out["instances"].gt_classes.shape) == (0,)
    out = _instance_mapper()(dict(_instance_dict(tmp_path), annotations=[]))
    assert tuple(out["instances"].gt_masks.shape) == (0, H, W) and len(out["instances"].gt_boxes) == 0


def test_bad_files_raise_clear_errors(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    label = _save(tmp_path / "l.png", _halves(1, 2))
    with pytest.raises(OSError, match="broken.jpg"):
        _semantic()({"file_name": str(broken), "sem_seg_file_name": label})
    small = _save(tmp_path / "small.png", np.zeros((H - 1, W), np.uint8))
    with pytest.raises(ValueError, match="small.png"):
        _semantic()({"file_name": _image(tmp_path), "sem_seg_file_name": small})
    rgb_label = _save(tmp_path / "rgb.png", np.zeros((H, W, 3), np.uint8))
    with pytest.raises(ValueError, match="single-channel"):
        _semantic()({"file_name": _image(tmp_path), "sem_seg_file_name": rgb_label})
    with pytest.raises(ValueError, match="sem_seg_file_name"):
        _semantic()({"file_name": _image(tmp_path)})


def test_color_aug_changes_images_only():
    np.random.seed(1)
    image = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    tfm = ColorAugSSDTransform(img_format="RGB")
    outs = [tfm.apply_image(image) for _ in range(8)]
    assert all(o.dtype == np.uint8 and o.shape == image.shape for o in outs)
    assert any(not np.array_equal(o, image) for o in outs)
    label = _halves(1, 300, np.uint16)
    assert tfm.apply_segmentation(label) is label
    coords = np.array([[1.0, 2.0]])
    assert tfm.apply_coords(coords) is coords
    with pytest.raises(ValueError, match="INPUT.FORMAT"):
        ColorAugSSDTransform(img_format="L")
