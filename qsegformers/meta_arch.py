"""``MaskFormer``: the meta-architecture that wires backbone, head (pixel + transformer decoder),
matcher, criterion and inference. It owns the data flow; each stage owns only its own tensors."""
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from torch import Tensor, nn

from .backbones.swin import PRIOR_PREFIX
from .config import check_unsupported_keys
from .inference import QueryPostprocessing
from .losses.build import build_criterion
from .losses.semask_prior import (
    IGNORE_LABEL,
    PRIOR_LOSS_KEY,
    fuse_priors,
    prior_loss_weight_from_config,
    semantic_targets,
    semask_prior_loss,
)
from .matching.build import build_matcher
from .sliding_window import sliding_window_scores

__all__ = ["MaskFormer", "SeMaskMaskFormer"]


@META_ARCH_REGISTRY.register()
class MaskFormer(nn.Module):
    """Mask classification for semantic, panoptic and instance segmentation (official name and keys)."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        criterion: nn.Module,
        num_queries: int,
        object_mask_threshold: float,
        overlap_threshold: float,
        metadata,
        size_divisibility: int,
        sem_seg_postprocess_before_inference: bool,
        pixel_mean: List[float],
        pixel_std: List[float],
        semantic_on: bool = True,
        panoptic_on: bool = False,
        instance_on: bool = False,
        test_topk_per_image: int = 100,
        ignore_value: int = IGNORE_LABEL,
        sliding_window: bool = False,
        slide_crop: int = 0,
        slide_stride: int = 0,
    ):
        """
        Args:
            sem_seg_head: a head whose ``predictor`` follows the decoder contract
                (:class:`~qsegformers.decoders.base.QueryDecoder`): ``class_activation`` and
                ``queries_are_classes`` are read from it.
            size_divisibility: pad images to a multiple of this (< 0: the backbone's own value).
            sem_seg_postprocess_before_inference: resize masks to the output size before combining them
                (always done for panoptic and instance outputs).
            test_topk_per_image: instances kept per image.
            ignore_value: label of ignored pixels in the semantic map that supervises backbone priors
                (features named ``sem_*``, e.g. SeMask's); weighted by ``criterion.weight_dict["loss_sem_prior"]``.
            sliding_window: semantic inference on ``slide_crop`` x ``slide_crop`` windows every
                ``slide_stride`` pixels, scores averaged where windows overlap (semantic output only).
        """
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.num_queries = num_queries
        self.overlap_threshold = overlap_threshold
        self.object_mask_threshold = object_mask_threshold
        self.metadata = metadata
        if size_divisibility < 0:
            size_divisibility = self.backbone.size_divisibility
        self.size_divisibility = size_divisibility
        self.sem_seg_postprocess_before_inference = sem_seg_postprocess_before_inference or panoptic_on or instance_on
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.semantic_on = semantic_on
        self.instance_on = instance_on
        self.panoptic_on = panoptic_on
        self.test_topk_per_image = test_topk_per_image
        self.ignore_value = ignore_value
        if not (semantic_on or panoptic_on or instance_on):
            raise ValueError("Enable at least one of MODEL.MASK_FORMER.TEST.{SEMANTIC_ON,PANOPTIC_ON,INSTANCE_ON}.")
        self.class_activation = sem_seg_head.predictor.class_activation
        if sliding_window and (panoptic_on or instance_on):
            raise ValueError(
                "TEST.SLIDING_WINDOW averages semantic scores only; disable MODEL.MASK_FORMER.TEST.PANOPTIC_ON "
                "and INSTANCE_ON, or TEST.SLIDING_WINDOW."
            )
        self.sliding_window = sliding_window
        self.slide_crop = slide_crop
        self.slide_stride = slide_stride
        # Set by test-time augmentation: also return the per-query predictions at output size.
        self.return_query_outputs = False

    @classmethod
    def from_config(cls, cfg):
        check_unsupported_keys(cfg)
        mf = cfg.MODEL.MASK_FORMER
        backbone = build_backbone(cfg)
        sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        predictor = sem_seg_head.predictor
        matcher = build_matcher(cfg, mf.MATCHER_NAME or predictor.matcher_name)
        criterion = build_criterion(cfg, mf.CRITERION_NAME or predictor.criterion_name, sem_seg_head.num_classes, matcher)
        # Read only when the backbone returns semantic priors (SeMask); once per iteration, not per layer.
        criterion.weight_dict[PRIOR_LOSS_KEY] = prior_loss_weight_from_config(cfg)
        test = mf.TEST
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": criterion,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "object_mask_threshold": test.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": test.OVERLAP_THRESHOLD,
            "metadata": MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if cfg.DATASETS.TRAIN else None,
            "size_divisibility": mf.SIZE_DIVISIBILITY,
            "sem_seg_postprocess_before_inference": test.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "semantic_on": test.SEMANTIC_ON,
            "instance_on": test.INSTANCE_ON,
            "panoptic_on": test.PANOPTIC_ON,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "sliding_window": cfg.TEST.SLIDING_WINDOW,
            "slide_crop": cfg.TEST.SLIDE_CROP,
            "slide_stride": cfg.TEST.SLIDE_STRIDE,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise each ``image`` (C x H x W, 0-255) and pad the batch to ``size_divisibility``."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)

    def forward(self, batched_inputs: List[Dict]):
        """batched_inputs: detectron2 dicts with ``image`` and, in training, ``instances`` (gt_classes,
        gt_masks). Training returns the weighted losses; inference returns one dict per image with
        ``sem_seg`` (K x H x W), ``panoptic_seg`` (ids H x W, segments_info) and/or ``instances``."""
        if self.sliding_window and not self.training:
            return self.sliding_window_inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        if self.training:
            if "instances" not in batched_inputs[0]:
                raise ValueError("Training inputs need 'instances' (gt_classes, gt_masks) from the dataset mapper.")
            targets = self.prepare_targets([x["instances"].to(self.device) for x in batched_inputs], images)
            priors = [features.pop(k) for k in sorted(features) if k.startswith(PRIOR_PREFIX)]
            outputs = self.sem_seg_head(features, targets=targets)
            losses = self.criterion(outputs, targets)
            if priors:
                losses[PRIOR_LOSS_KEY] = self.prior_loss(priors, targets, images)
            return self.criterion.weighted(losses)
        outputs = self.sem_seg_head(features)
        return self.inference(outputs, batched_inputs, images)

    def prior_loss(self, priors: List[Tensor], targets: List[Dict[str, Tensor]], images: ImageList) -> Tensor:
        """Unweighted CE of the fused backbone priors (each B x K x H_i x W_i) against the semantic map painted
        from the prepared targets (uncovered and padded pixels ignored)."""
        size = tuple(images.tensor.shape[-2:])
        gt = semantic_targets(targets, size, self.ignore_value).to(priors[0].device)
        return semask_prior_loss(fuse_priors(priors, size), gt, self.ignore_value)

    def prepare_targets(self, gt_instances, images: ImageList) -> List[Dict[str, Tensor]]:
        """Per image: ``labels`` (T,) and ``masks`` (T x H_pad x W_pad) padded like the image batch."""
        h_pad, w_pad = images.tensor.shape[-2:]
        targets = []
        for inst in gt_instances:
            gt_masks = inst.gt_masks
            gt_masks = gt_masks.tensor if hasattr(gt_masks, "tensor") else gt_masks
            padded = gt_masks.new_zeros((gt_masks.shape[0], h_pad, w_pad))
            padded[:, : gt_masks.shape[1], : gt_masks.shape[2]] = gt_masks
            targets.append({"labels": inst.gt_classes, "masks": padded})
        return targets

    def query_postprocessing(self) -> QueryPostprocessing:
        """This model's inference settings (thresholds, thing ids, activation, top-k)."""
        return QueryPostprocessing(
            num_classes=self.sem_seg_head.num_classes,
            activation=self.class_activation,
            object_mask_threshold=self.object_mask_threshold,
            overlap_threshold=self.overlap_threshold,
            thing_ids=self._thing_ids(),
            topk=self.test_topk_per_image,
            panoptic_on=self.panoptic_on,
            queries_are_classes=self.sem_seg_head.predictor.queries_are_classes,
        )

    def inference(self, outputs: Dict, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        """One dict per image with the enabled outputs; with ``self.return_query_outputs`` also
        ``query_outputs``: {"mask_cls": Q x C logits, "mask_pred": Q x height x width mask logits}
        (what test-time augmentation pools over augmentations)."""
        post = self.query_postprocessing()
        mask_cls_results = outputs["pred_logits"]
        mask_pred_results = F.interpolate(
            outputs["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear", align_corners=False
        )
        processed = []
        for mask_cls, mask_pred, input_per_image, image_size in zip(
            mask_cls_results, mask_pred_results, batched_inputs, images.image_sizes
        ):
            height = input_per_image.get("height", image_size[0])
            width = input_per_image.get("width", image_size[1])
            result = {}
            if self.sem_seg_postprocess_before_inference:
                mask_pred = sem_seg_postprocess(mask_pred, image_size, height, width)
                mask_cls = mask_cls.to(mask_pred)
            if self.semantic_on:
                sem = post.semantic(mask_cls, mask_pred)
                if not self.sem_seg_postprocess_before_inference:
                    sem = sem_seg_postprocess(sem, image_size, height, width)
                result["sem_seg"] = sem
            if self.panoptic_on:
                result["panoptic_seg"] = post.panoptic(mask_cls, mask_pred)
            if self.instance_on:
                result["instances"] = post.instances(mask_cls, mask_pred)
            if self.return_query_outputs:
                if not self.sem_seg_postprocess_before_inference:
                    mask_pred = sem_seg_postprocess(mask_pred, image_size, height, width)
                result["query_outputs"] = {"mask_cls": mask_cls, "mask_pred": mask_pred}
            processed.append(result)
        return processed

    def window_semantic_scores(self, windows: Tensor) -> Tensor:
        """B x C x h x w normalised windows -> B x K x h x w semantic scores, as whole-image inference
        computes them (windows padded to ``size_divisibility``, masks resized to the padded size)."""
        height, width = windows.shape[-2:]
        images = ImageList.from_tensors(list(windows), self.size_divisibility)
        outputs = self.sem_seg_head(self.backbone(images.tensor))
        size = images.tensor.shape[-2:]
        masks = F.interpolate(outputs["pred_masks"], size=size, mode="bilinear", align_corners=False)
        post = self.query_postprocessing()
        return torch.stack(
            [post.semantic(cls, m[:, :height, :width]) for cls, m in zip(outputs["pred_logits"], masks)]
        )

    def sliding_window_inference(self, batched_inputs: List[Dict]) -> List[Dict]:
        """``{"sem_seg": K x height x width}`` per image from TEST.SLIDE_CROP windows (see
        :func:`qsegformers.sliding_window.sliding_window_scores`), resized like whole-image inference."""
        processed = []
        for x in batched_inputs:
            image = (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std
            image_size = tuple(image.shape[-2:])
            sem = sliding_window_scores(image, self.window_semantic_scores, self.slide_crop, self.slide_stride)
            height, width = x.get("height", image_size[0]), x.get("width", image_size[1])
            processed.append({"sem_seg": sem_seg_postprocess(sem, image_size, height, width)})
        return processed

    def _thing_ids(self) -> set:
        mapping = getattr(self.metadata, "thing_dataset_id_to_contiguous_id", None) if self.metadata else None
        return set(mapping.values()) if mapping else set()


@META_ARCH_REGISTRY.register()
class SeMaskMaskFormer(MaskFormer):
    """Official SeMask-Mask2Former meta-architecture name. :class:`MaskFormer` already adds the prior loss
    whenever the backbone returns priors, so this alias only lets official SeMask configs build."""

