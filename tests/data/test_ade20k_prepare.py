"""ADE20K prepare scripts (panoptic, instance, full-847) on raw files written in the official formats.

The writers here produce the raw releases (SceneParsing PNGs, instance-challenge PNGs and devkit files,
the ADE20K 2021 index and ``_seg.png`` files); ``test_ade20k.py`` uses them for its miniature copy.
Expected outputs are built by hand from the generated layouts.
"""
import json
import os
import pickle
from collections import Counter

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import MetadataCatalog
from PIL import Image

from qsegformers.data.datasets.ade20k import (
    ADE20K_150_CLASSES,
    ADE20K_FULL_IGNORE_LABEL,
    ADE20K_THING_IDS,
    ade20k_paths,
    register_all_ade20k,
)

from dataset_test_utils import load_prepare_script

IGNORE = 255
# Instance-challenge ids are a permutation of the things (reversed), so that a script that skipped
# the mapping would produce wrong category ids.
INSTANCE_ID = {ade: len(ADE20K_THING_IDS) - k for k, ade in enumerate(ADE20K_THING_IDS)}
WALL, FLOOR, BED, CHAIR = 0, 3, 7, 19
ADE_SOURCE = "annotations_instance.tar"


def write_instance_devkit(root, categories=True):
    """``ade20k_instance_catid_mapping.txt`` (+ ``ade20k_instance_imgCatIds.json`` with upper-case names)."""
    paths = ade20k_paths(root, "train")
    os.makedirs(os.path.dirname(paths["instance_mapping"]), exist_ok=True)
    lines = ["Instance100\tSceneParsing150\tName"]
    lines += [f"{INSTANCE_ID[ade]}\t{ade + 1}\t{ADE20K_150_CLASSES[ade].split(',')[0].replace(' ', '_')}"
              for ade in ADE20K_THING_IDS]
    with open(paths["instance_mapping"], "w") as f:
        f.write("\n".join(lines) + "\n")
    if categories:
        cats = [{"id": INSTANCE_ID[ade], "name": ADE20K_150_CLASSES[ade].upper()} for ade in ADE20K_THING_IDS]
        with open(paths["instance_categories"], "w") as f:
            json.dump({"images": [], "categories": cats}, f)


def write_ade_image(root, split, stem, label, instances, seed=0):
    """One image of ADEChallengeData2016: ``label`` H x W contiguous ids (255 = other) for the SceneParsing
    PNG, ``instances`` [(H x W bool mask, contiguous thing id)] for the instance PNG (G = 1, 2, ...)."""
    paths = ade20k_paths(root, split)
    for key in ("image_root", "raw_sem_seg_root", "raw_instance_root"):
        os.makedirs(paths[key], exist_ok=True)
    h, w = label.shape
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        os.path.join(paths["image_root"], stem + ".jpg"))
    Image.fromarray(np.where(label == IGNORE, 0, label + 1).astype(np.uint8)).save(
        os.path.join(paths["raw_sem_seg_root"], stem + ".png"))
    ins = np.zeros((h, w, 3), dtype=np.uint8)
    for k, (mask, cls) in enumerate(instances, start=1):
        ins[mask, 0], ins[mask, 1] = INSTANCE_ID[cls], k
    Image.fromarray(ins).save(os.path.join(paths["raw_instance_root"], stem + ".png"))


def write_ade_full(root, images, objectnames):
    """ADE20K_2021_17_01 with ``index_ade20k.pkl``; ``images``: [(split dir, scene, name, H x W class values)].

    ``_seg.png``: R = value // 256 * 10, G = value % 256, B = an instance id (must be ignored).
    """
    full = os.path.join(root, "ADE20K_2021_17_01")
    index = {"filename": [], "folder": [], "objectnames": list(objectnames), "scene": []}
    for k, (dirname, scene, name, values) in enumerate(images):
        folder = f"ADE20K_2021_17_01/images/ADE/{dirname}/{scene}"
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        h, w = values.shape
        rng = np.random.default_rng(k)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            os.path.join(root, folder, name + ".jpg"))
        seg = np.stack([values // 256 * 10, values % 256, np.full_like(values, 7)], axis=-1).astype(np.uint8)
        Image.fromarray(seg).save(os.path.join(root, folder, name + "_seg.png"))
        index["filename"].append(name + ".jpg")
        index["folder"].append(folder)
        index["scene"].append(scene)
    with open(os.path.join(full, "index_ade20k.pkl"), "wb") as f:
        pickle.dump(index, f)


def read_panoptic(path):
    from panopticapi.utils import rgb2id

    with Image.open(path) as im:
        return rgb2id(np.asarray(im))


def read_text(path):
    with open(path) as f:
        return f.read()


def read_tif(path):
    with Image.open(path) as im:
        return np.asarray(im)


def box(x0, y0, x1, y1):
    """H x W bool mask of rows y0..y1-1, columns x0..x1-1 (8 x 10 image)."""
    mask = np.zeros((8, 10), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_panoptic_and_instances_overlaps_void_and_multiple_instances(tmp_path):
    """8 x 10: wall everywhere labelled; floor in rows 6-7; two chairs (one over floor pixels, which the
    SceneParsing PNG calls floor); a bed region of the semantic PNG with no instance (-> void)."""
    root = str(tmp_path)
    write_instance_devkit(root, categories=False)
    label = np.full((8, 10), WALL)
    label[0, :] = IGNORE
    label[6:, :] = FLOOR
    label[1:3, 6:] = BED  # semantic thing without instance
    chair1, chair2 = box(0, 2, 3, 5), box(4, 4, 6, 8)  # chair2 covers floor pixels rows 6-7, cols 4-5
    label[chair1] = CHAIR
    label[4:6, 4:6] = CHAIR
    write_ade_image(root, "val", "ADE_val_00000001", label, [(chair1, CHAIR), (chair2, CHAIR)])
    pan = load_prepare_script("prepare_ade20k_pan_seg")
    assert pan.main(["--root", root, "--splits", "val"]) == 1
    paths = ade20k_paths(root, "val")
    ids = read_panoptic(os.path.join(paths["panoptic_root"], "ADE_val_00000001.png"))
    # stuff in class order (wall = 1, floor = 2), then instances in G order (3, 4)
    expected = np.zeros((8, 10), dtype=np.int64)
    expected[(label == WALL)] = 1
    expected[6:, :] = 2
    expected[chair1] = 3
    expected[chair2] = 4
    np.testing.assert_array_equal(ids, expected)
    with open(paths["panoptic_json"]) as f:
        data = json.load(f)
    assert data["images"] == [{"id": "ADE_val_00000001", "file_name": "ADE_val_00000001.jpg", "width": 10, "height": 8}]
    segs = data["annotations"][0]["segments_info"]
    wall_area = 10 * 5 - 2 * 4 - 9 - 4  # rows 1-5, minus bed (2 x 4), chair1 (3 x 3), chair2 rows 4-5
    assert segs == [
        {"id": 1, "category_id": WALL, "area": wall_area, "bbox": [0, 1, 10, 5], "iscrowd": 0},
        {"id": 2, "category_id": FLOOR, "area": 20 - 4, "bbox": [0, 6, 10, 2], "iscrowd": 0},
        {"id": 3, "category_id": CHAIR, "area": 9, "bbox": [0, 2, 3, 3], "iscrowd": 0},
        {"id": 4, "category_id": CHAIR, "area": 8, "bbox": [4, 4, 2, 4], "iscrowd": 0},
    ]
    assert sum(s["area"] for s in segs) == int((ids > 0).sum())
    cats = data["categories"]
    assert [c["id"] for c in cats] == list(range(150))
    assert {c["id"] for c in cats if c["isthing"]} == set(ADE20K_THING_IDS)

    ins = load_prepare_script("prepare_ade20k_ins_seg")
    assert ins.main(["--root", root, "--splits", "val"]) == 2
    with open(paths["instances_json"]) as f:
        data = json.load(f)
    annos = data["annotations"]
    assert [(a["id"], a["image_id"], a["category_id"], a["area"], a["bbox"], a["iscrowd"]) for a in annos] == [
        (1, "ADE_val_00000001", CHAIR, 9, [0, 2, 3, 3], 0), (2, "ADE_val_00000001", CHAIR, 8, [4, 4, 2, 4], 0)]
    np.testing.assert_array_equal(mask_util.decode(annos[1]["segmentation"]).astype(bool), chair2)
    # no devkit category list: detectron2's names
    assert data["categories"][0] == {"id": ADE20K_THING_IDS[0], "name": ADE20K_150_CLASSES[ADE20K_THING_IDS[0]]}
    assert [c["id"] for c in data["categories"]] == sorted(ADE20K_THING_IDS)

    # idempotent: a second run rewrites the same files
    before = read_text(paths["instances_json"])
    ins.main(["--root", root, "--splits", "val"])
    pan.main(["--root", root, "--splits", "val"])
    assert read_text(paths["instances_json"]) == before
    np.testing.assert_array_equal(read_panoptic(os.path.join(paths["panoptic_root"], "ADE_val_00000001.png")), expected)


def test_pan_and_ins_scripts_name_missing_inputs(tmp_path):
    root = str(tmp_path)
    for script in ("prepare_ade20k_pan_seg", "prepare_ade20k_ins_seg"):
        with pytest.raises(FileNotFoundError, match=r"ade20k_instance_catid_mapping\.txt.*annotations_instance\.tar"):
            load_prepare_script(script).main(["--root", root])
    write_instance_devkit(root)
    label = np.full((8, 10), WALL)
    write_ade_image(root, "train", "ADE_train_00000001", label, [])
    os.remove(os.path.join(ade20k_paths(root, "train")["raw_instance_root"], "ADE_train_00000001.png"))
    for script in ("prepare_ade20k_pan_seg", "prepare_ade20k_ins_seg"):
        with pytest.raises(FileNotFoundError, match=r"annotations_instance/training/ADE_train_00000001\.png.*"
                                                    r"sceneparsing\.csail\.mit\.edu"):
            load_prepare_script(script).main(["--root", root, "--splits", "train"])


def test_bad_mapping_and_mixed_instance_categories_are_errors(tmp_path):
    root = str(tmp_path)
    write_instance_devkit(root)
    mapping = ade20k_paths(root, "train")["instance_mapping"]
    with open(mapping) as f:
        lines = f.read().splitlines()
    with open(mapping, "w") as f:
        f.write("\n".join(lines[:-1] + [f"1 {WALL + 1} wall"]) + "\n")  # wall is stuff
    with pytest.raises(ValueError, match="ADE20K_THING_IDS"):
        load_prepare_script("prepare_ade20k_pan_seg").main(["--root", root])

    write_instance_devkit(root)
    write_ade_image(root, "val", "ADE_val_00000001", np.full((8, 10), WALL), [(box(0, 0, 2, 2), BED)])
    path = os.path.join(ade20k_paths(root, "val")["raw_instance_root"], "ADE_val_00000001.png")
    ins = np.asarray(Image.open(path)).copy()
    ins[0, 0, 0] = INSTANCE_ID[CHAIR]  # instance 1 is partly bed, partly chair
    Image.fromarray(ins).save(path)
    with pytest.raises(ValueError, match="instance 1 has category"):
        load_prepare_script("prepare_ade20k_ins_seg").main(["--root", root, "--splits", "val"])


def test_full_selection_rule_counts_images_per_split():
    full = load_prepare_script("prepare_ade20k_full_sem_seg")
    counts = {"train": Counter({5: 3, 6: 1, 7: 2}), "val": Counter({5: 1, 7: 2, 8: 4})}
    assert full.select_classes(counts) == [5, 7]
    assert full.select_classes(counts, "both", 2) == [7]
    assert full.select_classes(counts, "train", 2) == [5, 7]
    assert full.select_classes(counts, "any") == [5, 6, 7, 8]
    with pytest.raises(ValueError, match="unknown rule"):
        full.select_classes(counts, "all")


def test_full_decodes_r_g_classes_rule_options_categories_file_and_resize(tmp_path):
    """Class values 300 (R = 10, G = 44), 4, 513 (R = 20, G = 1): 300 in both train images and val, 4 in one
    train image, 513 in val only."""
    root = str(tmp_path)
    names = [f"object {k}" for k in range(1, 600)]
    a = np.zeros((8, 10), dtype=np.int64)
    a[:, :6], a[:, 6:] = 300, 4
    b = np.full((8, 10), 300)
    c = np.zeros((8, 10), dtype=np.int64)
    c[:4, :], c[4:, :] = 513, 300
    write_ade_full(root, [("training", "kitchen", "ADE_train_00000001", a),
                          ("training", "street/road", "ADE_frame_00000002", b),
                          ("validation", "kitchen", "ADE_val_00000003", c)], names)
    full = load_prepare_script("prepare_ade20k_full_sem_seg")
    paths = {s: ade20k_paths(root, s) for s in ("train", "val")}

    def labels(split, name):
        return read_tif(os.path.join(paths[split]["full_sem_seg_root"], name + ".tif"))

    assert full.main(["--root", root, "--rule", "train", "--min-images", "2"]) == 3
    with open(paths["train"]["full_categories_json"]) as f:
        assert json.load(f)["categories"] == [{"trainId": 0, "id": 300, "name": "object 300"}]
    out = labels("train", "ADE_train_00000001")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, np.where(a == 300, 0, ADE20K_FULL_IGNORE_LABEL))
    np.testing.assert_array_equal(labels("train", "ADE_frame_00000002"), np.zeros((8, 10)))

    cats = tmp_path / "official.json"
    cats.write_text(json.dumps([{"name": "b", "id": 300, "trainId": 1}, {"name": "a", "id": 513, "trainId": 0}]))
    full.main(["--root", root, "--categories", str(cats), "--splits", "val", "--max-short-side", "4"])
    out = labels("val", "ADE_val_00000003")
    assert out.shape == (4, 5)  # shorter side 8 -> 4, nearest labels
    np.testing.assert_array_equal(out, np.repeat([[0], [0], [1], [1]], 5, axis=1))
    with Image.open(os.path.join(paths["val"]["full_image_root"], "ADE_val_00000003.jpg")) as im:
        assert im.size == (5, 4)
    register_all_ade20k(root)
    try:
        assert MetadataCatalog.get("ade20k_full_sem_seg_val").stuff_classes == ["a", "b"]
        assert len(MetadataCatalog.get("ade20k_full_sem_seg_val").stuff_colors) == 2
    finally:
        register_all_ade20k()


def test_full_missing_index_names_path_and_source(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ADE20K_2021_17_01/index_ade20k\.pkl.*ade20k\.csail\.mit\.edu"):
        load_prepare_script("prepare_ade20k_full_sem_seg").main(["--root", str(tmp_path)])
