"""Bad inputs in training and evaluation: unusual image modes, EXIF orientation, tiny and extreme sizes,
empty or ignore-only targets, targets that vanish in the crop, and unusable samples, which are dropped
with one warning (training) or reported with the file name (evaluation)."""
import logging

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from qsegformers.config import add_qsegformers_config
from qsegformers.data.mappers import (
    DropBadSamples,
    MaskFormerInstanceDatasetMapper,
    MaskFormerSemanticDatasetMapper,
    SafeTestDatasetMapper,
)
from qsegformers.data.mappers import robust
from qsegformers.data.seeded_dataset import SeededMapDataset
from qsegformers.utils.image_io import ImageReadError

IGNORE = 255
PAD = 128
NUM_CLASSES = 3
H, W = 6, 10
EXIF_ORIENTATION_TAG = 0x0112
ROTATE_90_CW = 6  # EXIF orientation: display = raw rotated 90 degrees clockwise


def _semantic(augmentations=(), size_divisibility=0):
    return MaskFormerSemanticDatasetMapper(
        True, augmentations=list(augmentations), image_format="RGB", ignore_label=IGNORE,
        size_divisibility=size_divisibility, num_classes=NUM_CLASSES,
    )


def _rgb():
    """H x W x 3 uint8 with distinct values per pixel and channel."""
    return (np.arange(H * W * 3, dtype=np.int64).reshape(H, W, 3) % 251).astype(np.uint8)


def _label(h=H, w=W):
    label = np.zeros((h, w), np.uint8)
    label[:, w // 2:] = 2
    return label


def _record(tmp_path, image: Image.Image, label=None, **save_kwargs):
    path = tmp_path / "image.png"
    image.save(path, **save_kwargs)
    label_path = tmp_path / "label.png"
    Image.fromarray(_label(*image.size[::-1]) if label is None else label).save(label_path)
    return {"file_name": str(path), "sem_seg_file_name": str(label_path)}


@pytest.fixture
def warnings_of_robust():
    caught = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = caught.append
    logger = logging.getLogger(robust.__name__)
    logger.addHandler(handler)
    yield caught
    logger.removeHandler(handler)


def _image_hwc(out):
    return out["image"].permute(1, 2, 0).numpy()


def test_grayscale_rgba_palette_and_16_bit_images_become_rgb(tmp_path):
    rgb = _rgb()
    gray = rgb[..., 0]
    out = _semantic()(_record(tmp_path, Image.fromarray(gray, mode="L")))
    np.testing.assert_array_equal(_image_hwc(out), np.repeat(gray[..., None], 3, axis=2))

    rgba = np.concatenate([rgb, np.full((H, W, 1), 7, np.uint8)], axis=2)
    out = _semantic()(_record(tmp_path, Image.fromarray(rgba, mode="RGBA")))
    np.testing.assert_array_equal(_image_hwc(out), rgb)

    palette_colors = np.array([[10, 20, 30], [200, 100, 50], [0, 255, 0]], np.uint8)
    indices = (np.arange(H * W).reshape(H, W) % len(palette_colors)).astype(np.uint8)
    palette = Image.fromarray(indices, mode="P")
    palette.putpalette(palette_colors.flatten().tolist())
    out = _semantic()(_record(tmp_path, palette))
    np.testing.assert_array_equal(_image_hwc(out), palette_colors[indices])

    sixteen = (np.arange(H * W).reshape(H, W) * 1000).astype(np.uint16)
    out = _semantic()(_record(tmp_path, Image.fromarray(sixteen)))
    expected = np.round(sixteen.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(_image_hwc(out), np.repeat(expected[..., None], 3, axis=2))
    assert out["sem_seg"].tolist() == _label().tolist()


def test_exif_orientation_is_applied_so_the_image_matches_its_upright_label(tmp_path):
    raw = _rgb()  # stored H x W, displayed W x H
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = ROTATE_90_CW
    upright_label = _label(W, H)
    out = _semantic()(_record(tmp_path, Image.fromarray(raw), upright_label, exif=exif.tobytes()))
    np.testing.assert_array_equal(_image_hwc(out), np.rot90(raw, k=-1))
    assert tuple(out["sem_seg"].shape) == (W, H)


def test_image_smaller_than_the_crop_and_the_divisor_is_padded(tmp_path):
    crop = T.RandomCrop("absolute", (64, 64))
    out = _semantic([crop], size_divisibility=32)(_record(tmp_path, Image.fromarray(_rgb())))
    image, sem_seg = _image_hwc(out), out["sem_seg"]
    assert image.shape == (32, 32, 3) and tuple(sem_seg.shape) == (32, 32)
    np.testing.assert_array_equal(image[:H, :W], _rgb())
    assert (image[H:] == PAD).all() and (image[:, W:] == PAD).all()
    assert (sem_seg[H:] == IGNORE).all() and (sem_seg[:, W:] == IGNORE).all()
    assert out["instances"].gt_classes.tolist() == [0, 2]
    masks = out["instances"].gt_masks
    assert masks[0].sum() == H * (W // 2) and masks[1].sum() == H * (W - W // 2)  # nothing in the padding


def test_extreme_aspect_ratios(tmp_path, warnings_of_robust):
    resize = T.ResizeShortestEdge((16,), 64, "choice")
    thin = np.full((4, 400, 3), 9, np.uint8)  # resized to 1 x 64 (the long side is capped)
    record = _record(tmp_path, Image.fromarray(thin), np.ones((4, 400), np.uint8))
    out = _semantic([resize], size_divisibility=32)(record)
    assert tuple(out["image"].shape) == (3, 32, 64) and out["instances"].gt_classes.tolist() == [1]
    assert out["instances"].gt_masks[0].sum() == 64  # the one resized row, full width

    hair = np.full((1, 2000, 3), 9, np.uint8)  # the resize would make the short side 0: dropped
    record = _record(tmp_path, Image.fromarray(hair), np.ones((1, 2000), np.uint8))
    assert DropBadSamples(_semantic([resize]))(record) is None
    assert len(warnings_of_robust) == 1 and record["file_name"] in warnings_of_robust[0].getMessage()


def test_ignore_only_labels_and_empty_annotations_give_images_without_targets(tmp_path):
    out = _semantic()(_record(tmp_path, Image.fromarray(_rgb()), np.full((H, W), IGNORE, np.uint8)))
    assert len(out["instances"]) == 0 and tuple(out["instances"].gt_masks.shape) == (0, H, W)
    assert (out["sem_seg"] == IGNORE).all()

    instance = MaskFormerInstanceDatasetMapper(True, augmentations=[], image_format="RGB", size_divisibility=0)
    record = _record(tmp_path, Image.fromarray(_rgb()))
    out = instance({"file_name": record["file_name"], "annotations": []})
    assert len(out["instances"]) == 0 and len(out["instances"].gt_boxes) == 0


def test_instance_whose_polygon_vanishes_in_the_crop_is_dropped(tmp_path):
    record = _record(tmp_path, Image.fromarray(_rgb()))
    left = [0.0, 0.0, 3.0, 0.0, 3.0, H, 0.0, H]  # x in [0, 3]
    right = [7.0, 0.0, W, 0.0, W, H, 7.0, H]  # x in [7, W]
    annotations = [
        {"bbox": [0, 0, 3, H], "bbox_mode": BoxMode.XYXY_ABS, "segmentation": [left], "category_id": 0},
        {"bbox": [7, 0, W, H], "bbox_mode": BoxMode.XYXY_ABS, "segmentation": [right], "category_id": 1},
    ]
    crop_left = T.CropTransform(0, 0, 5, H)  # keeps x in [0, 5): the right object vanishes
    mapper = MaskFormerInstanceDatasetMapper(True, augmentations=[crop_left], image_format="RGB",
                                             size_divisibility=0)
    out = mapper({"file_name": record["file_name"], "annotations": annotations})
    assert out["instances"].gt_classes.tolist() == [0]
    assert out["instances"].gt_masks.shape == (1, H, 5) and out["instances"].gt_masks[0, :, :3].all()


def test_unusable_samples_are_dropped_with_one_warning_each(tmp_path, warnings_of_robust):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG truncated")
    label = tmp_path / "label.png"
    Image.fromarray(_label()).save(label)
    mapper = DropBadSamples(_semantic())
    assert mapper({"file_name": str(broken), "sem_seg_file_name": str(label)}) is None

    out_of_range = _label()
    out_of_range[0, 0] = NUM_CLASSES  # not a class and not the ignore label
    record = _record(tmp_path, Image.fromarray(_rgb()), out_of_range)
    assert mapper(record) is None
    messages = [r.getMessage() for r in warnings_of_robust]
    assert len(messages) == 2
    assert "broken.png" in messages[0]
    assert "label.png has class ids [3] outside 0..2" in messages[1]


def test_loader_replaces_a_dropped_sample_deterministically(tmp_path, warnings_of_robust):
    good = _record(tmp_path, Image.fromarray(_rgb()))
    bad = {"file_name": str(tmp_path / "missing.png"), "sem_seg_file_name": good["sem_seg_file_name"]}
    records = [bad, good, good]
    dataset = SeededMapDataset(records, DropBadSamples(_semantic()), seed=3)
    out = dataset[(0, 11)]  # record 0 is bad: another record is mapped in its place
    np.testing.assert_array_equal(_image_hwc(out), _rgb())
    again = dataset[(0, 11)]
    assert torch.equal(out["image"], again["image"])
    assert all("missing.png" in r.getMessage() for r in warnings_of_robust) and warnings_of_robust


def _test_mapper():
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TEST = 0  # no resize
    return SafeTestDatasetMapper(cfg, False)


def test_evaluation_mapper_reads_16_bit_images_and_names_unreadable_files(tmp_path):
    sixteen = np.full((H, W), 257 * 100, np.uint16)  # 8-bit value 100 (clipping would give 255)
    record = _record(tmp_path, Image.fromarray(sixteen))
    out = _test_mapper()(dict(record, image_id=5))
    assert out["image"].shape == (3, H, W) and (out["image"] == 100).all()
    assert "sem_seg_file_name" not in out

    with pytest.raises(ImageReadError, match=r"broken\.png \(image_id 7\)"):
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"nope")
        _test_mapper()({"file_name": str(broken), "image_id": 7})
