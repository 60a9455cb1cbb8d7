"""tools/demo.py: images of several kinds (RGB JPEG, grayscale, RGBA, 16-bit, EXIF-rotated, corrupt), a
video, the instance confidence threshold and the exit status; qsegformers/utils/image_io.py's decoding."""
import importlib.util
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.structures import Instances
from PIL import Image

pytestmark = pytest.mark.smoke  # also run on the current stack (.ci/run)

with warnings.catch_warnings():
    # matplotlib 3.9 (imported by detectron2's Visualizer) builds its parsers with pyparsing names that
    # pyparsing 3.3 deprecates, at import time.
    warnings.simplefilter("ignore", DeprecationWarning)
    from detectron2.utils.visualizer import Visualizer

from qsegformers.utils.demo_predictor import choose_task, filter_instances
from qsegformers.utils.image_io import ImageReadError, read_image_any

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "demo.py"
PANOPTIC_CFG = str(REPO / "configs" / "toy" / "panoptic-segmentation" / "maskformer2_R18_toy.yaml")
# A random-init toy model at a tiny test size, with semantic, panoptic and instance outputs.
TINY = [
    "MODEL.WEIGHTS", "",
    "INPUT.MIN_SIZE_TEST", "32",
    "INPUT.MAX_SIZE_TEST", "64",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8",
    "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "True",
]
EXIF_ORIENTATION_TAG = 0x0112
ROTATE_90_CW = 6  # EXIF orientation: the stored image is shown rotated 90 degrees clockwise
VIDEO_FRAMES, VIDEO_SIZE = 5, (64, 48)  # (width, height)


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("qseg_demo_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pixels(path, mode=None):
    with Image.open(path) as image:
        return np.asarray(image.convert(mode) if mode else image)


def _size(path):
    with Image.open(path) as image:
        return image.size


def _scene(h, w, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _corrupt_jpeg(path):
    """The first bytes of a valid JPEG: the header parses, decoding fails."""
    buffer = io.BytesIO()
    Image.fromarray(_scene(40, 40, 9)).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[:200])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Folder of test images; returns (folder, {name: expected output (width, height)})."""
    folder = tmp_path_factory.mktemp("demo_inputs")
    Image.fromarray(_scene(48, 64, 0)).save(folder / "rgb.jpg", quality=95)
    Image.fromarray(_scene(40, 56, 1)[:, :, 0], mode="L").save(folder / "gray.png")
    rgba = np.dstack([_scene(44, 60, 2), np.full((44, 60), 128, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(folder / "rgba.png")
    gradient = np.linspace(0, 65535, 36 * 52).reshape(36, 52).astype(np.uint16)
    Image.fromarray(gradient).save(folder / "sixteen.png")  # 16-bit grayscale PNG
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = ROTATE_90_CW
    Image.fromarray(_scene(40, 64, 3)).save(folder / "exif.jpg", exif=exif.tobytes())  # stored 64 wide, 40 high
    _corrupt_jpeg(folder / "corrupt.jpg")
    expected = {"rgb.jpg": (64, 48), "gray.png": (56, 40), "rgba.png": (60, 44), "sixteen.png": (52, 36),
                "exif.jpg": (40, 64)}  # shown upright: 40 wide, 64 high
    return folder, expected


def test_read_image_any_decodes_odd_images(images):
    folder, _ = images
    gradient = _pixels(folder / "sixteen.png").astype(np.float64)
    sixteen = read_image_any(str(folder / "sixteen.png"), format="RGB")
    assert sixteen.dtype == np.uint8 and sixteen.shape == (36, 52, 3)
    # 0 -> 0, 65535 -> 255, linear in between; the three channels equal
    np.testing.assert_array_equal(sixteen[..., 0], np.round(gradient * 255 / 65535).astype(np.uint8))
    assert sixteen[0, 0, 0] == 0 and sixteen[-1, -1, 0] == 255
    assert (sixteen[..., 1] == sixteen[..., 0]).all() and (sixteen[..., 2] == sixteen[..., 0]).all()

    gray = read_image_any(str(folder / "gray.png"), format="RGB")
    np.testing.assert_array_equal(gray, np.repeat(_scene(40, 56, 1)[:, :, :1], 3, axis=2))
    rgba = read_image_any(str(folder / "rgba.png"), format="BGR")
    np.testing.assert_array_equal(rgba, _scene(44, 60, 2)[:, :, ::-1])  # alpha dropped, BGR order

    stored = _pixels(folder / "exif.jpg")
    upright = read_image_any(str(folder / "exif.jpg"), format="RGB")
    assert upright.shape == (64, 40, 3)
    np.testing.assert_array_equal(upright, np.rot90(stored, k=-1))  # 90 degrees clockwise

    with pytest.raises(ImageReadError, match="corrupt.jpg"):
        read_image_any(str(folder / "corrupt.jpg"))
    with pytest.raises(ImageReadError, match="missing.png"):
        read_image_any(str(folder / "missing.png"))


def test_demo_writes_every_readable_image_and_skips_the_corrupt_one(demo, images, tmp_path):
    folder, expected = images
    out = tmp_path / "out"
    args = demo.get_parser().parse_args(
        ["--config-file", PANOPTIC_CFG, "--input", str(folder), "--output", str(out), "--opts", *TINY])
    report = demo.run(args)
    assert sorted(os.listdir(out)) == sorted(expected)
    for name, size in expected.items():
        assert _size(out / name) == size, name
    assert list(report.failed) == [str(folder / "corrupt.jpg")]
    assert "cannot read image" in report.failed[str(folder / "corrupt.jpg")]
    assert sorted(report.succeeded) == sorted(str(folder / n) for n in expected)
    # mixed inputs (a glob and a plain file) through main(): exit status 0, one output file
    single = tmp_path / "single.png"
    status = demo.main(["--config-file", PANOPTIC_CFG, "--input", str(folder / "corrupt.jpg"),
                        str(folder / "rgb.jpg"), "--output", str(tmp_path / "two"), "--task", "semantic",
                        "--opts", *TINY])
    assert status == 0
    assert os.listdir(tmp_path / "two") == ["rgb.jpg"]
    status = demo.main(["--config-file", PANOPTIC_CFG, "--input", str(folder / "g*.png"), "--output", str(single),
                        "--opts", *TINY])
    assert status == 0 and _size(single) == expected["gray.png"]


def test_confidence_threshold_controls_the_drawn_instances(demo, images, tmp_path):
    folder, _ = images
    drawings = {}
    for threshold in ("0.0", "1.01"):
        out = tmp_path / f"t{threshold}.png"
        assert demo.main(["--config-file", PANOPTIC_CFG, "--input", str(folder / "rgb.jpg"), "--output", str(out),
                          "--task", "instance", "--confidence-threshold", threshold, "--opts", *TINY]) == 0
        drawings[threshold] = _pixels(out, "RGB").astype(np.int16)
    # the image as detectron2's Visualizer renders it with nothing drawn on it
    blank = Visualizer(_pixels(folder / "rgb.jpg", "RGB")).output.get_image().astype(np.int16)
    # nothing scores above 1: nothing is drawn; at 0 every instance (random-init scores) is drawn
    np.testing.assert_array_equal(drawings["1.01"], blank)
    assert np.abs(drawings["0.0"] - blank).mean() > 10.0


def test_filter_instances_and_task_choice():
    instances = Instances((4, 4))
    instances.scores = torch.tensor([0.2, 0.6, 0.9, 0.5])
    assert filter_instances(instances, 0.5).scores.tolist() == pytest.approx([0.6, 0.9, 0.5])
    assert choose_task({"sem_seg": 0, "instances": 0}) == "instance"
    assert choose_task({"sem_seg": 0, "instances": 0, "panoptic_seg": 0}) == "panoptic"
    assert choose_task({"sem_seg": 0}) == "semantic"
    with pytest.raises(ValueError, match="INSTANCE_ON"):
        choose_task({"sem_seg": 0}, "instance")


def test_demo_on_a_video(demo, tmp_path):
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, VIDEO_SIZE, True)
    for i in range(VIDEO_FRAMES):
        writer.write(_scene(VIDEO_SIZE[1], VIDEO_SIZE[0], 20 + i))
    writer.release()
    out = tmp_path / "clip_seg.avi"
    assert demo.main(["--config-file", PANOPTIC_CFG, "--video-input", str(video), "--output", str(out),
                      "--opts", *TINY]) == 0
    capture = cv2.VideoCapture(str(out))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    assert len(frames) == VIDEO_FRAMES
    assert all(f.shape == (VIDEO_SIZE[1], VIDEO_SIZE[0], 3) for f in frames)
    assert demo.main(["--config-file", PANOPTIC_CFG, "--video-input", str(tmp_path / "none.avi"),
                      "--output", str(tmp_path / "x.avi"), "--opts", *TINY]) == 1


def test_exit_status_is_nonzero_when_every_input_fails(images, tmp_path):
    folder, _ = images
    bad = tmp_path / "bad"
    bad.mkdir()
    _corrupt_jpeg(bad / "a.jpg")
    (bad / "b.png").write_bytes(b"not an image at all")
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--config-file", PANOPTIC_CFG, "--input", str(bad), "--output",
         str(tmp_path / "out"), "--opts", *TINY],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert "a.jpg" in log and "b.png" in log and "skipped" in log
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
