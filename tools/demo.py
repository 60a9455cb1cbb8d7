#!/usr/bin/env python
"""Run a qsegformers model on images, a video or a webcam and draw its predictions.

Examples::

    python tools/demo.py --config-file configs/toy/panoptic-segmentation/maskformer2_R18_toy.yaml \\
        --input img1.jpg photos/ "more/*.png" --output out/ --opts MODEL.WEIGHTS model_final.pth
    python tools/demo.py --config-file CFG --video-input clip.mp4 --output clip_seg.mp4 --opts MODEL.WEIGHTS W
    python tools/demo.py --config-file CFG --webcam --opts MODEL.WEIGHTS W MODEL.DEVICE cpu

What is drawn: ``--task`` semantic, panoptic or instance, or by default ("auto") the panoptic output when
the model returns one, else the instances, else the semantic map. Instances below
``--confidence-threshold`` are not drawn. Images that cannot be read (corrupt, not an image) are reported
and skipped; the exit status is 0 only if at least one input was processed.
"""
import argparse
import glob
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List

import cv2
import numpy as np
from detectron2.utils.logger import setup_logger
from PIL import Image
from tqdm import tqdm

from qsegformers.utils.demo_predictor import TASKS, SegmentationDemo, choose_task
from qsegformers.utils.image_io import ImageReadError, read_image_any
from qsegformers.utils.tool_setup import setup_tool_cfg

logger = logging.getLogger("qsegformers.tools.demo")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# FourCC of the video writer per output extension (both are in opencv-python-headless's own FFmpeg).
VIDEO_CODECS = {".avi": "MJPG", ".mp4": "mp4v", ".mkv": "mp4v"}
DEFAULT_VIDEO_CODEC = "mp4v"
DEFAULT_FPS = 30.0
WINDOW_NAME = "qsegformers"
ESC_KEY = 27
WEBCAM_INDEX = 0


@dataclass
class DemoReport:
    """What a run did: outputs written per input, and the reason each failed input was skipped."""

    succeeded: Dict[str, str] = field(default_factory=dict)  # input -> output path ("" when shown only)
    failed: Dict[str, str] = field(default_factory=dict)  # input -> error message


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files, folders or glob patterns (quote them)")
    source.add_argument("--video-input", help="a video file")
    source.add_argument("--webcam", action="store_true", help="read frames from the default camera")
    parser.add_argument(
        "--output",
        help="output file (one input) or folder (created when missing); without it the drawings are shown "
        "in a window (needs an OpenCV build with GUI support)",
    )
    parser.add_argument("--task", choices=TASKS, default="auto", help="what to draw (default: auto)")
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score of drawn instances")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model_final.pth")
    return parser


def expand_inputs(patterns: List[str]) -> List[str]:
    """Files named by ``patterns``: folders give their image files (sorted), globs their matches; a
    plain path is kept even if missing, so that it is reported as a failed input."""
    paths = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            names = sorted(os.listdir(pattern))
            paths += [os.path.join(pattern, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
        elif glob.has_magic(pattern):
            paths += sorted(glob.glob(os.path.expanduser(pattern)))
        else:
            paths.append(pattern)
    return paths


def _is_folder_output(output: str, num_inputs: int) -> bool:
    return num_inputs > 1 or os.path.isdir(output) or output.endswith(os.sep) or not os.path.splitext(output)[1]


def _output_path(output: str, path: str, folder: bool) -> str:
    if not folder:
        return output
    os.makedirs(output, exist_ok=True)
    return os.path.join(output, os.path.basename(path))


def _show(image_bgr: np.ndarray) -> bool:
    """Show a drawing in a window; False when the user pressed Esc."""
    try:
        cv2.imshow(WINDOW_NAME, image_bgr)
        return cv2.waitKey(1) != ESC_KEY
    except cv2.error as e:
        raise SystemExit(f"cannot open a window ({e.msg.strip()}); pass --output to save the drawings instead") from e


def _summary(predictions: Dict, task: str, threshold: float) -> str:
    chosen = choose_task(predictions, task)
    if chosen == "panoptic":
        return f"{len(predictions['panoptic_seg'][1])} panoptic segments"
    if chosen == "instance":
        scores = predictions["instances"].scores
        return f"{int((scores >= threshold).sum())} instances with score >= {threshold}"
    classes = predictions["sem_seg"].argmax(dim=0).unique().tolist()
    return f"semantic classes {classes}"


def run_on_images(demo: SegmentationDemo, args) -> DemoReport:
    report = DemoReport()
    paths = expand_inputs(args.input)
    if not paths:
        logger.error("no input image found for %s", args.input)
    folder = bool(args.output) and _is_folder_output(args.output, len(paths))
    for path in tqdm(paths, desc="images", disable=len(paths) < 2):
        try:
            image = read_image_any(path, format="BGR")
        except ImageReadError as e:
            logger.error("%s; skipped", e)
            report.failed[path] = str(e)
            continue
        start = time.perf_counter()
        predictions, drawing = demo.run_on_image(image)
        logger.info("%s: %s in %.3f s", path, _summary(predictions, args.task, args.confidence_threshold),
                    time.perf_counter() - start)
        if args.output:
            out = _output_path(args.output, path, folder)
            Image.fromarray(drawing).save(out)
            report.succeeded[path] = out
        else:
            report.succeeded[path] = ""
            if not _show(drawing[:, :, ::-1]):
                break
    return report


def _frames(capture: cv2.VideoCapture):
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        yield frame


def run_on_video(demo: SegmentationDemo, args) -> DemoReport:
    report = DemoReport()
    source = WEBCAM_INDEX if args.webcam else args.video_input
    name = "webcam" if args.webcam else args.video_input
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        message = f"cannot open video {name!r}"
        logger.error(message)
        report.failed[name] = message
        return report
    width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = capture.get(cv2.CAP_PROP_FPS) or DEFAULT_FPS
    num_frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if not args.webcam else None
    writer, out = None, ""
    if args.output:
        out = _output_path(args.output, name, _is_folder_output(args.output, 1)) if not args.webcam else args.output
        codec = VIDEO_CODECS.get(os.path.splitext(out)[1].lower(), DEFAULT_VIDEO_CODEC)
        writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*codec), fps, (width, height), True)
    count, start = 0, time.perf_counter()
    for drawing in tqdm(demo.run_on_video(_frames(capture)), desc="frames", total=num_frames):
        count += 1
        if writer is not None:
            writer.write(drawing)
        elif not _show(drawing):
            break
    capture.release()
    if writer is not None:
        writer.release()
    if count == 0:
        message = f"no frame could be read from {name!r}"
        logger.error(message)
        report.failed[name] = message
    else:
        elapsed = time.perf_counter() - start
        logger.info("%s: %d frames in %.2f s (%.3f s per frame)", name, count, elapsed, elapsed / count)
        report.succeeded[name] = out
    return report


def run(args) -> DemoReport:
    """Process the inputs of parsed ``args``; returns what succeeded and what failed."""
    cfg = setup_tool_cfg(args.config_file, args.opts)
    demo = SegmentationDemo(cfg, task=args.task, confidence_threshold=args.confidence_threshold)
    report = run_on_images(demo, args) if args.input else run_on_video(demo, args)
    logger.info("%d input(s) done, %d failed", len(report.succeeded), len(report.failed))
    return report


def main(argv=None) -> int:
    """Exit status: 0 when at least one input was processed, else 1."""
    args = get_parser().parse_args(argv)
    report = run(args)
    return 0 if report.succeeded else 1


if __name__ == "__main__":
    setup_logger(name="fvcore")
    setup_logger(name="qsegformers")
    sys.exit(main())
