"""Predict and visualise one image or video frame with any qsegformers config (used by ``tools/demo.py``).

The model runs through detectron2's ``DefaultPredictor`` (test-time resize to ``INPUT.MIN_SIZE_TEST`` /
``MAX_SIZE_TEST``, outputs at the input resolution); drawing uses detectron2's ``Visualizer`` for images
and ``VideoVisualizer`` for video frames (instance colours kept across frames).
"""
from typing import Dict, Iterable, Iterator, Tuple

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.structures import Instances
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer

from ..engine.checkpoint import QsegCheckpointer

__all__ = ["TASKS", "SegmentationDemo", "choose_task", "filter_instances"]

AUTO = "auto"
# Output key of each task, and the config switch that makes the model return it.
TASK_OUTPUTS: Dict[str, Tuple[str, str]] = {
    "panoptic": ("panoptic_seg", "MODEL.MASK_FORMER.TEST.PANOPTIC_ON"),
    "instance": ("instances", "MODEL.MASK_FORMER.TEST.INSTANCE_ON"),
    "semantic": ("sem_seg", "MODEL.MASK_FORMER.TEST.SEMANTIC_ON"),
}
TASKS = (AUTO,) + tuple(TASK_OUTPUTS)  # "auto" picks the first output present, in this order
UNUSED_METADATA = "__unused"


def _safe_predictor(cfg) -> DefaultPredictor:
    """detectron2's ``DefaultPredictor`` whose weights are loaded by :class:`QsegCheckpointer` (no
    unpickling of code unless ``MODEL.ALLOW_PICKLE_WEIGHTS``); ``DefaultPredictor`` itself would use
    the unrestricted ``DetectionCheckpointer``."""
    without_weights = cfg.clone()
    without_weights.defrost()
    without_weights.MODEL.WEIGHTS = ""
    without_weights.freeze()
    predictor = DefaultPredictor(without_weights)
    QsegCheckpointer.from_config(cfg, predictor.model).load(cfg.MODEL.WEIGHTS)
    return predictor


def choose_task(predictions: Dict, task: str = AUTO) -> str:
    """The task to draw: ``task`` itself, or with "auto" panoptic, else instance, else semantic.

    Raises:
        ValueError: the model did not return the output ``task`` needs (names the config key to set).
    """
    if task == AUTO:
        for name, (key, _) in TASK_OUTPUTS.items():
            if key in predictions:
                return name
        raise ValueError(f"the model returned none of {[k for k, _ in TASK_OUTPUTS.values()]}")
    if task not in TASK_OUTPUTS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    key, switch = TASK_OUTPUTS[task]
    if key not in predictions:
        raise ValueError(f"--task {task} needs the model's {key!r} output: add `{switch} True` to --opts")
    return task


def filter_instances(instances: Instances, confidence_threshold: float) -> Instances:
    """The instances whose ``scores`` reach ``confidence_threshold``."""
    return instances[instances.scores >= confidence_threshold]


class SegmentationDemo:
    """Runs a config's model on BGR images and draws its semantic, panoptic or instance output."""

    def __init__(
        self,
        cfg,
        *,
        task: str = AUTO,
        confidence_threshold: float = 0.5,
        instance_mode: ColorMode = ColorMode.IMAGE,
    ):
        """
        Args:
            cfg: a frozen qsegformers config (``MODEL.WEIGHTS`` is loaded; "" keeps random weights).
            task: one of :data:`TASKS`.
            confidence_threshold: instances scoring below this are not drawn (instance task only;
                panoptic segments are already thresholded by the model's inference settings).
            instance_mode: detectron2 colour mode of instance drawings.
        """
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
        self.task = task
        self.confidence_threshold = confidence_threshold
        self.instance_mode = instance_mode
        self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else UNUSED_METADATA)
        self.predictor = _safe_predictor(cfg)
        self.cpu = torch.device("cpu")

    def predict(self, image: np.ndarray) -> Dict:
        """image: H x W x 3 uint8 BGR. Returns the model's output dict for it (at H x W)."""
        return self.predictor(image)

    def visualize(self, image: np.ndarray, predictions: Dict) -> np.ndarray:
        """Draw ``predictions`` on ``image`` (H x W x 3 BGR); returns the H x W x 3 RGB drawing."""
        rgb = image[:, :, ::-1]
        visualizer = Visualizer(rgb, self.metadata, instance_mode=self.instance_mode)
        task = choose_task(predictions, self.task)
        if task == "panoptic":
            panoptic_seg, segments_info = predictions["panoptic_seg"]
            vis = visualizer.draw_panoptic_seg(panoptic_seg.to(self.cpu), segments_info)
        elif task == "instance":
            instances = filter_instances(predictions["instances"].to(self.cpu), self.confidence_threshold)
            vis = visualizer.draw_instance_predictions(predictions=instances)
        else:
            vis = visualizer.draw_sem_seg(predictions["sem_seg"].argmax(dim=0).to(self.cpu))
        return vis.get_image()

    def run_on_image(self, image: np.ndarray) -> Tuple[Dict, np.ndarray]:
        """Predict and draw one H x W x 3 BGR image; returns (predictions, H x W x 3 RGB drawing)."""
        predictions = self.predict(image)
        return predictions, self.visualize(image, predictions)

    def run_on_video(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Yield one H x W x 3 BGR drawing per BGR frame, with instance colours tracked across frames."""
        video_visualizer = VideoVisualizer(self.metadata, self.instance_mode)
        for frame in frames:
            predictions = self.predict(frame)
            rgb = frame[:, :, ::-1]
            chosen = choose_task(predictions, self.task)
            if chosen == "panoptic":
                panoptic_seg, segments_info = predictions["panoptic_seg"]
                vis = video_visualizer.draw_panoptic_seg_predictions(rgb, panoptic_seg.to(self.cpu), segments_info)
            elif chosen == "instance":
                instances = filter_instances(predictions["instances"].to(self.cpu), self.confidence_threshold)
                vis = video_visualizer.draw_instance_predictions(rgb, instances)
            else:
                vis = video_visualizer.draw_sem_seg(rgb, predictions["sem_seg"].argmax(dim=0).to(self.cpu))
            yield np.ascontiguousarray(vis.get_image()[:, :, ::-1])
