"""tools/check_dataset.py: every problem kind it promises is found in a small dataset on disk broken in
one way, reported with the file, in the summary table, and with exit status 1; a clean dataset passes."""
import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from custom_dataset_files import CLASS_NAMES, H, W, slot_opts, write_dataset

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIGS = {"sem_seg": "semantic", "coco_panoptic": "panoptic", "coco_instance": "instance"}
STEM = "val_001"  # the file each test breaks


def _tool():
    spec = importlib.util.spec_from_file_location("check_dataset", os.path.join(REPO, "tools", "check_dataset.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def data(tmp_path):
    return {"train": write_dataset(str(tmp_path), "train", 2), "val": write_dataset(str(tmp_path), "val", 3)}


def check(fmt: str, data, capsys, *extra) -> tuple:
    """Run the tool on the example config of ``fmt`` pointed at ``data``: ``(exit status, stdout)``."""
    config = os.path.join(REPO, "configs", "custom", f"{CONFIGS[fmt]}-segmentation", "maskformer2_R18_custom.yaml")
    opts = (slot_opts("TRAIN", fmt, "chk_train", data["train"]) + slot_opts("TEST", fmt, "chk_val", data["val"])
            + ["DATASETS.TRAIN", "('chk_train',)", "DATASETS.TEST", "('chk_val',)"] + list(extra))
    status = _tool().main([config, "--no-progress", "--opts", *opts])
    return status, capsys.readouterr().out


def assert_reported(out: str, kind: str, path: str, *details):
    """``kind`` is listed for ``path`` (with each of ``details`` on that line) and has a table row."""
    lines = [line for line in out.splitlines() if line.startswith(f"[{kind}] {path}")]
    assert lines, f"no [{kind}] line for {path} in:\n{out}"
    for detail in details:
        assert any(detail in line for line in lines), (detail, lines)
    from qsegformers.data.datasets.custom_check_files import PROBLEM_KINDS

    assert any(line.startswith(f"| {PROBLEM_KINDS[kind]}") for line in out.splitlines()), out


def _edit_json(path: str, edit) -> None:
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _label(data, fmt="sem_seg") -> str:
    key = "sem_seg_root" if fmt == "sem_seg" else "panoptic_sem_seg_root"
    return os.path.join(data["val"][key], STEM + ".png")


def _image(data) -> str:
    return os.path.join(data["val"]["image_root"], STEM + ".jpg")


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
def test_clean_dataset_passes(fmt, data, capsys):
    status, out = check(fmt, data, capsys)
    assert status == 0, out
    assert "No problem found in 2 dataset(s), 5 records." in out


@pytest.mark.parametrize("fmt", ["sem_seg", "coco_instance"])
def test_missing_image(fmt, data, capsys):
    os.remove(_image(data))
    status, out = check(fmt, data, capsys)
    assert status == 1
    assert_reported(out, "missing_file", _image(data), "image file does not exist")


def test_unreadable_image(data, capsys):
    with open(_image(data), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a JPEG")
    status, out = check("coco_panoptic", data, capsys)
    assert status == 1
    assert_reported(out, "unreadable_file", _image(data), "cannot decode the image")


@pytest.mark.parametrize("fmt", ["sem_seg", "coco_panoptic"])
def test_label_png_saved_as_rgb_colour(fmt, data, capsys):
    label = np.asarray(Image.open(_label(data, fmt)))
    palette = np.array([[200, 0, 0], [0, 200, 0], [0, 0, 200], [200, 200, 0]] + [[0, 0, 0]] * 252, dtype=np.uint8)
    Image.fromarray(palette[label]).save(_label(data, fmt))  # what a paint program exports
    status, out = check(fmt, data, capsys)
    assert status == 1
    assert_reported(out, "rgb_label", _label(data, fmt), "RGB colour image", "instead of class ids")
    assert "label_out_of_range" not in out


def test_label_values_outside_the_classes(data, capsys):
    label = np.asarray(Image.open(_label(data))).copy()
    label[0, :3] = [len(CLASS_NAMES), 9, 254]  # 4 classes: ids 0..3, 255 = ignore
    Image.fromarray(label).save(_label(data))
    status, out = check("sem_seg", data, capsys)
    assert status == 1
    assert_reported(out, "label_out_of_range", _label(data), "label values [4, 9, 254] are outside the 4 classes")


def test_image_and_label_size_mismatch(data, capsys):
    label = Image.open(_label(data))
    label.resize((W // 2, H // 2), Image.NEAREST).save(_label(data))
    status, out = check("sem_seg", data, capsys)
    assert status == 1
    assert_reported(out, "size_mismatch", _label(data), f"label is {W // 2}x{H // 2} (WxH), its image is {W}x{H}")


def _break_instance(kind):
    def edit(data):
        ann = data["annotations"][2]  # image 2's box (a polygon)
        if kind == "polygon":
            ann["segmentation"] = [[1.0, 1.0, 5.0, 5.0]]
        elif kind == "flat_polygon":
            ann["segmentation"] = [[1.0, 1.0, 5.0, 1.0, 9.0, 1.0]]
        else:
            ann["segmentation"] = {"size": [H, W], "counts": [H * W]}  # uncompressed RLE, all zeros
    return edit


@pytest.mark.parametrize("kind,detail", [
    ("polygon", "every polygon has fewer than 3 points"),
    ("flat_polygon", "polygon encloses no pixel"),
    ("rle", "RLE mask has no pixel"),
])
def test_empty_or_degenerate_instance_masks(kind, detail, data, capsys):
    _edit_json(data["val"]["instances_json"], _break_instance(kind))
    status, out = check("coco_instance", data, capsys)
    assert status == 1
    assert_reported(out, "empty_mask", data["val"]["instances_json"], f"annotation 3 of image {STEM}.jpg: {detail}")


def test_empty_panoptic_segment(data, capsys):
    def edit(pan):
        pan["annotations"][1]["segments_info"].append({"id": 3 * 100 + 9, "category_id": 3, "iscrowd": 0,
                                                       "area": 10, "bbox": [0, 0, 1, 1]})
    _edit_json(data["val"]["panoptic_json"], edit)
    status, out = check("coco_panoptic", data, capsys)
    assert status == 1
    pan_png = os.path.join(data["val"]["panoptic_root"], STEM + ".png")
    assert_reported(out, "empty_mask", pan_png, "segment 309 of segments_info has no pixel in the PNG")


@pytest.mark.parametrize("fmt", ["coco_instance", "coco_panoptic"])
def test_category_id_not_in_the_category_list(fmt, data, capsys):
    if fmt == "coco_instance":
        path = data["val"]["instances_json"]
        _edit_json(path, lambda d: d["annotations"][3].update(category_id=99))
        detail = f"annotation 4 of image {STEM}.jpg has category_id 99, which is not in 'categories' (ids [3, 7])"
    else:
        path = data["val"]["panoptic_json"]
        _edit_json(path, lambda d: d["annotations"][1]["segments_info"][0].update(category_id=99))
        detail = f"of {STEM}.png has category_id 99, which is not in 'categories' (ids [3, 7, 20, 21])"
    status, out = check(fmt, data, capsys)
    assert status == 1
    assert_reported(out, "unknown_category", path, detail)
    # the loader refuses the file with a message naming it, instead of detectron2's bare KeyError
    assert_reported(out, "unloadable", path, "category_id", "Run tools/check_dataset.py")


def test_panoptic_set_without_stuff_class(data, capsys):
    path = data["val"]["panoptic_json"]
    _edit_json(path, lambda d: [c.update(isthing=1) for c in d["categories"]])
    status, out = check("coco_panoptic", data, capsys)
    assert status == 1
    assert_reported(out, "no_stuff_class", path, "PQ_st cannot be computed")
    assert_reported(out, "config", os.path.join(REPO, "configs", "custom", "panoptic-segmentation",
                                                "maskformer2_R18_custom.yaml"), "has no stuff class")


def test_only_the_named_dataset_and_registration_errors(data, capsys):
    os.remove(_image(data))  # a val image: the train set alone is clean
    config = os.path.join(REPO, "configs", "custom", "semantic-segmentation", "maskformer2_R18_custom.yaml")
    opts = (slot_opts("TRAIN", "sem_seg", "chk_train", data["train"])
            + slot_opts("TEST", "sem_seg", "chk_val", data["val"])
            + ["DATASETS.TRAIN", "('chk_train',)", "DATASETS.TEST", "('chk_val',)"])
    tool = _tool()
    assert tool.main([config, "--dataset", "chk_train", "--no-progress", "--opts", *opts]) == 0
    assert "chk_train: 2 records, 0 problem(s)" in capsys.readouterr().out
    missing = data["val"]["sem_seg_root"] + "_nope"
    status = tool.main([config, "--no-progress", "--opts", *opts, "DATASETS.CUSTOM.TEST.SEM_SEG_ROOT", missing])
    out = capsys.readouterr().out
    assert status == 1
    assert_reported(out, "unloadable", config, f"DATASETS.CUSTOM.TEST.SEM_SEG_ROOT = {missing!r}")
