"""The generated qseg_toy dataset: determinism, caching, registration and agreement of its formats."""
import filecmp
import json
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures.masks import polygons_to_bitmask
from PIL import Image

from qsegformers.data.datasets import toy
from qsegformers.data.datasets.toy import (
    TOY_DATASET_NAMES,
    default_toy_root,
    generate_toy_dataset,
    register_toy_datasets,
    toy_paths,
)

pytestmark = pytest.mark.smoke  # also run on the current stack (.ci/run)

NUM_TRAIN, NUM_VAL = 6, 3  # small counts keep the tests fast
NUM_CLASSES = 6
IGNORE = 255
MIN_POLYGON_IOU = 0.9


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return generate_toy_dataset(str(tmp_path_factory.mktemp("toy") / "qseg_toy"), NUM_TRAIN, NUM_VAL)


@pytest.fixture
def registered(root):
    """Register the six datasets on the small module root; restore the default registration after."""
    yield register_toy_datasets(root, NUM_TRAIN, NUM_VAL)
    register_toy_datasets()


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _read(path):
    with Image.open(path) as im:
        return np.array(im)


def _load_json(path):
    with open(path) as f:
        return json.load(f)


def test_generation_is_deterministic_and_count_independent(tmp_path, root):
    a = generate_toy_dataset(str(tmp_path / "a"), 3, 2)
    b = generate_toy_dataset(str(tmp_path / "b"), 3, 2)
    files = _files(a)
    assert files == _files(b) and len(files) == 1 + 2 * 2 + 4 * (3 + 2)  # DONE, 2 json per split, 4 PNG/JPEG per image
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors
    # Image i does not depend on how many images are generated.
    images = [f for f in files if f.startswith("images") or f.startswith("panoptic_train" + os.sep)]
    _, mismatch, errors = filecmp.cmpfiles(a, root, images, shallow=False)
    assert not mismatch and not errors


def test_reuses_a_finished_generation_and_replaces_a_stale_one(tmp_path):
    root = generate_toy_dataset(str(tmp_path / "r"), 2, 1)
    done = os.path.join(root, toy.DONE_FILE)
    before = os.stat(done).st_mtime_ns
    assert generate_toy_dataset(root, 2, 1) == root and os.stat(done).st_mtime_ns == before
    generate_toy_dataset(root, 3, 1)
    assert _load_json(done)["num_train"] == 3
    assert len(os.listdir(os.path.join(root, "images", "train"))) == 3
    assert sorted(os.listdir(tmp_path)) == ["r"]  # no temporary or stale folders left behind


def test_refuses_a_foreign_folder_and_an_unwritable_root(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not a generated qseg_toy dataset"):
        generate_toy_dataset(str(foreign), 1, 1)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OSError, match="Cannot write the qseg_toy dataset to .*a_file"):
        generate_toy_dataset(str(tmp_path / "a_file" / "qseg_toy"), 1, 1)


def test_default_root_follows_the_environment(monkeypatch):
    monkeypatch.setenv("QSEG_TOY_DATASET", "/some/where")
    assert default_toy_root() == "/some/where"
    monkeypatch.delenv("QSEG_TOY_DATASET")
    monkeypatch.setenv("DETECTRON2_DATASETS", "/d2")
    assert default_toy_root() == os.path.join("/d2", "qseg_toy")


def test_registration_does_not_touch_disk_and_loading_generates(tmp_path):
    root = str(tmp_path / "lazy" / "qseg_toy")
    try:
        names = register_toy_datasets(root, 2, 1)
        assert sorted(names) == sorted(n for kind in TOY_DATASET_NAMES.values() for n in kind.values())
        assert not os.path.exists(os.path.dirname(root))
        assert MetadataCatalog.get("qseg_toy_sem_seg_val").sem_seg_root == toy_paths(root, "val")["sem_seg_root"]
        assert len(DatasetCatalog.get("qseg_toy_sem_seg_val")) == 1
        assert os.path.isfile(os.path.join(root, toy.DONE_FILE))
    finally:
        register_toy_datasets()


def test_metadata_has_what_the_evaluators_read(registered, root):
    sem = MetadataCatalog.get("qseg_toy_sem_seg_train")
    assert sem.evaluator_type == "sem_seg" and sem.ignore_label == IGNORE
    assert sem.stuff_classes == ["disc", "square", "triangle", "sky", "grass", "wall"]
    pan = MetadataCatalog.get("qseg_toy_panoptic_val")
    assert pan.evaluator_type == "coco_panoptic_seg" and pan.label_divisor == 1000
    assert os.path.isfile(pan.panoptic_json) and os.path.isdir(pan.panoptic_root)
    assert pan.thing_classes == ["disc", "square", "triangle"] and len(pan.stuff_classes) == NUM_CLASSES
    assert pan.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}
    assert pan.stuff_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 10: 3, 11: 4, 12: 5}
    inst = MetadataCatalog.get("qseg_toy_instance_val")
    assert inst.evaluator_type == "coco" and os.path.isfile(inst.json_file)
    assert inst.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}


def test_dataset_dicts_have_the_fields_the_evaluators_need(registered):
    sem = DatasetCatalog.get("qseg_toy_sem_seg_train")
    assert len(sem) == NUM_TRAIN
    assert {"file_name", "sem_seg_file_name", "height", "width", "image_id"} <= set(sem[0])
    pan = DatasetCatalog.get("qseg_toy_panoptic_train")
    assert len(pan) == NUM_TRAIN
    for d in pan:
        assert {"file_name", "image_id", "pan_seg_file_name", "sem_seg_file_name", "segments_info"} <= set(d)
        for seg in d["segments_info"]:
            assert 0 <= seg["category_id"] < NUM_CLASSES and seg["isthing"] == (seg["category_id"] < 3)
    inst = DatasetCatalog.get("qseg_toy_instance_train")
    assert [d["image_id"] for d in inst] == [d["image_id"] for d in pan]
    for d in inst:
        for ann in d["annotations"]:
            assert 0 <= ann["category_id"] < 3 and ann["iscrowd"] == 0 and len(ann["bbox"]) == 4
            assert all(len(p) >= 6 for p in ann["segmentation"])


def test_category_ids_in_the_json_files_are_not_contiguous(root):
    paths = toy_paths(root, "train")
    pan = _load_json(paths["panoptic_json"])
    assert sorted(c["id"] for c in pan["categories"]) == [1, 2, 3, 10, 11, 12]
    inst = _load_json(paths["instances_json"])
    assert sorted(c["id"] for c in inst["categories"]) == [1, 2, 3]


def test_images_are_real_jpegs(root):
    image_root = toy_paths(root, "val")["image_root"]
    for name in os.listdir(image_root):
        with Image.open(os.path.join(image_root, name)) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (128, 128)
            im.load()


def test_panoptic_reproduces_the_semantic_labels(registered):
    from panopticapi.utils import rgb2id

    saw_ignore = False
    semantic_files = {d["image_id"]: d["sem_seg_file_name"] for d in DatasetCatalog.get("qseg_toy_sem_seg_train")}
    for d in DatasetCatalog.get("qseg_toy_panoptic_train"):
        pan = rgb2id(_read(d["pan_seg_file_name"]))
        decoded = np.full(pan.shape, IGNORE, dtype=np.uint8)
        for seg in d["segments_info"]:
            assert (pan == seg["id"]).sum() == seg["area"] > 0
            decoded[pan == seg["id"]] = seg["category_id"]
        assert set(np.unique(pan)) <= {0} | {s["id"] for s in d["segments_info"]}
        semantic = _read(semantic_files[d["image_id"]])
        np.testing.assert_array_equal(decoded, semantic)
        np.testing.assert_array_equal(_read(d["sem_seg_file_name"]), semantic)
        saw_ignore |= bool((semantic == IGNORE).any())
    assert saw_ignore


def test_instance_polygons_match_the_panoptic_things(registered):
    from panopticapi.utils import rgb2id

    instances = {d["image_id"]: d for d in DatasetCatalog.get("qseg_toy_instance_train")}
    num_things = 0
    for d in DatasetCatalog.get("qseg_toy_panoptic_train"):
        pan = rgb2id(_read(d["pan_seg_file_name"]))
        things = [s for s in d["segments_info"] if s["isthing"]]
        annos = instances[d["image_id"]]["annotations"]
        assert len(annos) == len(things)
        for seg in things:
            mask = pan == seg["id"]
            ious = [(mask & m).sum() / (mask | m).sum() for m in
                    (polygons_to_bitmask(a["segmentation"], d["height"], d["width"]) for a in annos)]
            best = int(np.argmax(ious))
            assert ious[best] > MIN_POLYGON_IOU and annos[best]["category_id"] == seg["category_id"]
            num_things += 1
    assert num_things >= NUM_TRAIN


def test_cli_generates_and_prints_the_root(tmp_path, capsys):
    root = str(tmp_path / "cli")
    assert toy.main(["--root", root, "--num-train", "1", "--num-val", "1"]) == root
    assert capsys.readouterr().out.strip() == root
    assert os.path.isfile(os.path.join(root, toy.DONE_FILE))
