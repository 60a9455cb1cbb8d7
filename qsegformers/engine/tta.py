"""Test-time augmentation (multi-scale + horizontal flip) for semantic segmentation.

Each test image is resized to every ``TEST.AUG.MIN_SIZES`` (capped by ``TEST.AUG.MAX_SIZE``) and, with
``TEST.AUG.FLIP``, also flipped, using detectron2's ``DatasetMapperTTA``. The model post-processes every
prediction back to the original image size, so combining them only needs the flip undone; the result
is the mean of the per-augmentation class scores.
"""
from typing import Dict, List

import torch
from detectron2.modeling import DatasetMapperTTA
from fvcore.transforms import HFlipTransform
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["SemanticSegmentorWithTTA"]


def _is_flipped(transforms) -> bool:
    return any(isinstance(t, HFlipTransform) for t in transforms.transforms)


class SemanticSegmentorWithTTA(nn.Module):
    """Wraps a model that returns ``sem_seg`` (K x H x W scores at the input's height/width)."""

    def __init__(self, cfg, model: nn.Module, tta_mapper=None):
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        self.cfg = cfg.clone()
        self.model = model
        self.tta_mapper = tta_mapper if tta_mapper is not None else DatasetMapperTTA(cfg)

    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        """batched_inputs: detectron2 test dicts (``image`` C x H x W, optional ``height``/``width``)."""
        return [self._inference_one_image(self._with_size(x)) for x in batched_inputs]

    @staticmethod
    def _with_size(input_dict: Dict) -> Dict:
        d = dict(input_dict)
        d.setdefault("height", d["image"].shape[1])
        d.setdefault("width", d["image"].shape[2])
        return d

    def _inference_one_image(self, input_dict: Dict) -> Dict:
        total, count = None, 0
        for augmented in self.tta_mapper(input_dict):
            transforms = augmented.pop("transforms")
            with torch.no_grad():
                scores = self.model([augmented])[0]["sem_seg"]
            if _is_flipped(transforms):
                scores = scores.flip(dims=[2])
            total = scores if total is None else total + scores
            count += 1
        return {"sem_seg": total / count}
