"""Test-time augmentation (multi-scale + horizontal flip) for semantic, panoptic and instance outputs.

Each test image is resized to every ``TEST.AUG.MIN_SIZES`` (capped by ``TEST.AUG.MAX_SIZE``) and, with
``TEST.AUG.FLIP``, also flipped, using detectron2's ``DatasetMapperTTA``. The model post-processes
every prediction back to the original image size, so combining them only needs the flip undone.

* ``sem_seg``: the mean of the per-augmentation class scores (as Mask2Former).
* ``panoptic_seg``: Mask2Former's panoptic inference over the queries of *all* augmentations
  pooled together. Queries are not matched across augmentations (a query that segments the left
  object may segment the right one once the image is flipped); instead every query of every view
  competes for the pixels, so two views that agree give duplicates, and a duplicate wins no pixel
  (ties go to the earlier view) and is dropped.
* ``instances``: the top-k (query, class) pairs of the pooled queries, then class-wise mask
  non-maximum suppression (``TEST.AUG.MASK_NMS_THRESH``), as detectron2 merges detections over
  augmentations with box NMS.

With a single unflipped view at the input size, or a model whose predictions are flip-equivariant
and ``MIN_SIZES`` equal to the input size, the result is the plain prediction.
"""
from typing import Dict, List

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.layers import cat
from detectron2.modeling import DatasetMapperTTA
from detectron2.structures import Instances
from fvcore.transforms import HFlipTransform
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["MaskFormerWithTTA", "SemanticSegmentorWithTTA", "mask_nms"]

QUERY_OUTPUTS = "query_outputs"


def _is_flipped(transforms) -> bool:
    return any(isinstance(t, HFlipTransform) for t in transforms.transforms)


def mask_nms(instances: Instances, iou_threshold: float, max_detections: int) -> Instances:
    """Greedy class-wise non-maximum suppression on binary masks.

    Args:
        instances: ``pred_masks`` N x H x W {0, 1}, ``scores`` N, ``pred_classes`` N.
        iou_threshold: an instance is dropped when its mask IoU with a kept, higher-scoring
            instance of the same class exceeds this.
        max_detections: keep at most this many, by score.

    Returns:
        The kept instances, sorted by decreasing score.
    """
    order = torch.argsort(instances.scores, descending=True, stable=True)
    instances = instances[order]
    if len(instances) == 0:
        return instances
    binary = instances.pred_masks.bool().cpu().numpy()
    rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
    ious = np.asarray(mask_util.iou(rles, rles, [0] * len(rles))).reshape(len(rles), len(rles))
    classes = instances.pred_classes.tolist()
    kept: List[int] = []
    for i in range(len(instances)):
        if len(kept) == max_detections:
            break
        if all(classes[j] != classes[i] or ious[i, j] <= iou_threshold for j in kept):
            kept.append(i)
    return instances[torch.as_tensor(kept, dtype=torch.int64, device=instances.scores.device)]


class MaskFormerWithTTA(nn.Module):
    """Wraps a model that returns ``sem_seg`` (K x H x W scores at the input's height/width) and,
    for panoptic and instance outputs, follows the ``MaskFormer`` protocol: the flags
    ``semantic_on``/``panoptic_on``/``instance_on``, ``return_query_outputs`` and
    ``query_postprocessing()`` (see :class:`qsegformers.meta_arch.MaskFormer`)."""

    def __init__(self, cfg, model: nn.Module, tta_mapper=None):
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        self.cfg = cfg.clone()
        self.model = model
        self.tta_mapper = tta_mapper if tta_mapper is not None else DatasetMapperTTA(cfg)
        self.mask_nms_threshold = cfg.TEST.AUG.MASK_NMS_THRESH
        self.semantic_on = getattr(model, "semantic_on", True)
        self.panoptic_on = getattr(model, "panoptic_on", False)
        self.instance_on = getattr(model, "instance_on", False)
        self.needs_queries = self.panoptic_on or self.instance_on
        if self.needs_queries and not hasattr(model, "query_postprocessing"):
            raise TypeError(
                f"{type(model).__name__} has panoptic/instance outputs but no query_postprocessing(): "
                "test-time augmentation of those outputs needs the MaskFormer query protocol."
            )

    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        """batched_inputs: detectron2 test dicts (``image`` C x H x W, optional ``height``/``width``)."""
        previous = getattr(self.model, "return_query_outputs", False)
        if self.needs_queries:
            self.model.return_query_outputs = True
        try:
            return [self._inference_one_image(self._with_size(x)) for x in batched_inputs]
        finally:
            if self.needs_queries:
                self.model.return_query_outputs = previous

    @staticmethod
    def _with_size(input_dict: Dict) -> Dict:
        d = dict(input_dict)
        d.setdefault("height", d["image"].shape[1])
        d.setdefault("width", d["image"].shape[2])
        return d

    def _inference_one_image(self, input_dict: Dict) -> Dict:
        scores_sum, num_views = None, 0
        mask_cls, mask_pred = [], []
        for augmented in self.tta_mapper(input_dict):
            flipped = _is_flipped(augmented.pop("transforms"))
            with torch.no_grad():
                output = self.model([augmented])[0]
            num_views += 1
            if self.semantic_on:
                scores = output["sem_seg"].flip(dims=[2]) if flipped else output["sem_seg"]
                scores_sum = scores if scores_sum is None else scores_sum + scores
            if self.needs_queries:
                queries = output[QUERY_OUTPUTS]
                mask_cls.append(queries["mask_cls"])
                mask_pred.append(queries["mask_pred"].flip(dims=[2]) if flipped else queries["mask_pred"])
        result = {}
        if self.semantic_on:
            result["sem_seg"] = scores_sum / num_views
        if self.needs_queries:
            post = self.model.query_postprocessing()
            pooled_cls, pooled_pred = cat(mask_cls, dim=0), cat(mask_pred, dim=0)
            if self.panoptic_on:
                result["panoptic_seg"] = post.panoptic(pooled_cls, pooled_pred)
            if self.instance_on:
                candidates = post.instances(pooled_cls, pooled_pred, topk=post.topk * num_views)
                result["instances"] = mask_nms(candidates, self.mask_nms_threshold, post.topk)
        return result


# Mask2Former's name for the semantic-only wrapper; this one also handles panoptic and instances.
SemanticSegmentorWithTTA = MaskFormerWithTTA
