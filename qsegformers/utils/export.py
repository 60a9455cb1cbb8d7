"""Tensor-in, tensor-out wrapper of a semantic-segmentation MaskFormer for ONNX / TorchScript export.

detectron2 models take and return lists of dicts, which neither exporter handles. The wrapper takes the
image the model sees after its own preprocessing (normalised, padded to the size divisibility) and returns
the per-class scores MaskFormer's semantic inference computes, before the crop/resize to the original
image size (done by the caller: ``detectron2.modeling.postprocessing.sem_seg_postprocess``).

Export runs the multi-scale deformable attention on its pure-PyTorch path (``F.grid_sample``, ONNX opset
>= 16): the compiled op ``torch.ops.qsegformers.ms_deform_attn`` has no ONNX symbolic. The traced graph
is specialised to the sample's (padded) size: the deformable attention reads the feature-map sizes as
Python numbers, so another input size needs another export.
"""
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..inference import class_probs

__all__ = ["SemanticSegmentationExport", "preprocess_for_export", "export_quietly", "ONNX_OPSET"]

ONNX_OPSET = 17  # grid_sample needs >= 16
# DeprecationWarnings of the exporters this module uses on purpose (see ``export_quietly``).
EXPORTER_DEPRECATIONS = (
    "You are using the legacy TorchScript-based ONNX export",
    "The feature will be removed",
    "`torch.jit.save` is deprecated",
    "`torch.jit.load` is deprecated",
)


class SemanticSegmentationExport(nn.Module):
    """``image`` B x 3 x H x W (normalised, padded) -> B x K x H x W semantic scores."""

    def __init__(self, model: nn.Module):
        """model: a MaskFormer (``backbone``, ``sem_seg_head``, ``class_activation``), in eval mode."""
        super().__init__()
        self.backbone = model.backbone
        self.sem_seg_head = model.sem_seg_head
        self.class_activation = model.class_activation

    def forward(self, image: Tensor) -> Tensor:
        outputs = self.sem_seg_head(self.backbone(image))
        masks = F.interpolate(outputs["pred_masks"], size=image.shape[-2:], mode="bilinear", align_corners=False)
        probs = class_probs(outputs["pred_logits"], self.class_activation)  # B x Q x K
        return torch.einsum("bqc,bqhw->bchw", probs, masks.sigmoid())


def preprocess_for_export(model: nn.Module, image: Tensor) -> Tensor:
    """3 x H x W image (0-255, model input format) -> 1 x 3 x H' x W' normalised and padded as the model does."""
    return model.preprocess_image([{"image": image}]).tensor


def export_quietly(fn: Callable, *args, **kwargs) -> Optional[object]:
    """Call ``fn`` (an exporter, ``torch.jit.save`` / ``load``) without its known, expected warnings.

    * TracerWarnings flag the Python numbers frozen into the graph (feature-map sizes): the documented
      fixed-size limitation, which the numeric comparison after export checks.
    * torch >= 2.9 deprecates the TorchScript-based ONNX exporter in favour of the ``torch.export``-based
      one (``dynamo=True``), which needs the ``onnxscript`` package; the TorchScript-based one is used.
    * torch 2.13 deprecates TorchScript (``torch.jit.save`` / ``load``), which the TorchScript export is.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        for message in EXPORTER_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        return fn(*args, **kwargs)
