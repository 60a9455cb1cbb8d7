"""DeepLab-style ResNet (``build_resnet_deeplab_backbone``), as in detectron2's ``projects/DeepLab``.

detectron2's pip package lacks ``projects/DeepLab``, whose ResNet variant MaskFormer's and PFT's "R101c"
models use. This module reproduces its builder and parameter names, so that their configs and
checkpoints (e.g. MaskFormer's ``R-103.pkl``) load unchanged. Compared with detectron2's
``build_resnet_backbone`` it adds:

* ``MODEL.RESNETS.STEM_TYPE``: ``"basic"`` (one 7x7 conv) or ``"deeplab"`` (three 3x3 convs,
  :class:`DeepLabStem`: ``stem.conv1``, ``stem.conv2``, ``stem.conv3``, each with its ``norm``);
* ``MODEL.RESNETS.RES4_DILATION`` (1 or 2) and ``RES5_DILATION`` (1, 2 or 4): a dilated stage keeps the
  resolution of the stage before it (first stride 1), so res5 has stride 16 with ``RES5_DILATION`` 2, and
  res4 / res5 have stride 8 with ``RES4_DILATION`` 2 (which needs ``RES5_DILATION`` 4);
* ``MODEL.RESNETS.RES5_MULTI_GRID``: block ``i`` of res5 uses dilation ``RES5_DILATION * RES5_MULTI_GRID[i]``
  (DeepLabV3's multi-grid), also when ``RES5_DILATION`` is 1.

Everything else (blocks, ``ResNet``, ``make_stage``, freezing, deformable stages) is detectron2's own.
"""
import logging
from typing import List, Union

import fvcore.nn.weight_init as weight_init
import torch.nn.functional as F
from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock, DeformBottleneckBlock, ResNet
from torch import Tensor, nn

__all__ = ["DeepLabStem", "build_resnet_deeplab_backbone", "NUM_BLOCKS_PER_STAGE"]

logger = logging.getLogger(__name__)

STEM_KERNEL = 3  # the DeepLab stem's three convolutions are 3x3
STEM_POOL_KERNEL = 3  # max-pool after the stem convolutions (as in detectron2's BasicStem)
STEM_STRIDE = 4  # conv1 stride 2, then max-pool stride 2
# Bottleneck blocks of res2..res5 per depth (the DeepLab variant has no BasicBlock ResNets).
NUM_BLOCKS_PER_STAGE = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}
STAGE_INDEX = {"res2": 2, "res3": 3, "res4": 4, "res5": 5}
RES4_DILATIONS = (1, 2)
RES5_DILATIONS = (1, 2, 4)
RES5_DILATION_WITH_DILATED_RES4 = 4  # res5 keeps the dilation-to-stride ratio of a dilated res4
STEM_TYPES = ("basic", "deeplab")


class DeepLabStem(CNNBlockBase):
    """Three 3x3 conv + norm + ReLU (stride 2, 1, 1), then a 3x3 max-pool with stride 2.

    ``forward``: B x in_channels x H x W -> B x out_channels x ceil(H / 4) x ceil(W / 4).
    conv1 maps in_channels -> out_channels / 2, conv2 keeps out_channels / 2, conv3 maps to out_channels.
    """

    def __init__(self, *, in_channels: int = 3, out_channels: int = 128, norm: Union[str, nn.Module] = "BN"):
        if out_channels % 2:
            raise ValueError(
                f"The DeepLab stem halves its width in conv1/conv2: MODEL.RESNETS.STEM_OUT_CHANNELS must be even, "
                f"got {out_channels}."
            )
        super().__init__(in_channels, out_channels, STEM_STRIDE)
        half = out_channels // 2
        pad = STEM_KERNEL // 2
        self.conv1 = Conv2d(
            in_channels, half, kernel_size=STEM_KERNEL, stride=2, padding=pad, bias=False, norm=get_norm(norm, half)
        )
        self.conv2 = Conv2d(
            half, half, kernel_size=STEM_KERNEL, stride=1, padding=pad, bias=False, norm=get_norm(norm, half)
        )
        self.conv3 = Conv2d(
            half, out_channels, kernel_size=STEM_KERNEL, stride=1, padding=pad, bias=False,
            norm=get_norm(norm, out_channels),
        )
        for conv in (self.conv1, self.conv2, self.conv3):
            weight_init.c2_msra_fill(conv)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu_(self.conv1(x))
        x = F.relu_(self.conv2(x))
        x = F.relu_(self.conv3(x))
        return F.max_pool2d(x, kernel_size=STEM_POOL_KERNEL, stride=2, padding=STEM_POOL_KERNEL // 2)


def _build_stem(stem_type: str, in_channels: int, out_channels: int, norm) -> CNNBlockBase:
    if stem_type == "basic":
        return BasicStem(in_channels=in_channels, out_channels=out_channels, norm=norm)
    if stem_type == "deeplab":
        return DeepLabStem(in_channels=in_channels, out_channels=out_channels, norm=norm)
    raise ValueError(f"MODEL.RESNETS.STEM_TYPE = {stem_type!r} is unknown; choose one of {list(STEM_TYPES)}.")


def _check_dilations(depth: int, res4_dilation: int, res5_dilation: int, res5_multi_grid: List[int]) -> None:
    """Raise one clear ValueError for a combination the DeepLab ResNet does not build."""
    if depth not in NUM_BLOCKS_PER_STAGE:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH = {depth} is not built by build_resnet_deeplab_backbone (bottleneck ResNets "
            f"only: {sorted(NUM_BLOCKS_PER_STAGE)}); use build_resnet_backbone for R18/R34."
        )
    if res4_dilation not in RES4_DILATIONS:
        raise ValueError(f"MODEL.RESNETS.RES4_DILATION = {res4_dilation} must be one of {list(RES4_DILATIONS)}.")
    if res5_dilation not in RES5_DILATIONS:
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION = {res5_dilation} must be one of {list(RES5_DILATIONS)}.")
    if res4_dilation > 1 and res5_dilation != RES5_DILATION_WITH_DILATED_RES4:
        raise ValueError(
            f"MODEL.RESNETS.RES4_DILATION = {res4_dilation} needs MODEL.RESNETS.RES5_DILATION = "
            f"{RES5_DILATION_WITH_DILATED_RES4} (res5 is always dilated further than a dilated res4), got "
            f"{res5_dilation}."
        )
    num_res5_blocks = NUM_BLOCKS_PER_STAGE[depth][-1]
    if len(res5_multi_grid) != num_res5_blocks:
        raise ValueError(
            f"MODEL.RESNETS.RES5_MULTI_GRID = {list(res5_multi_grid)} needs one factor per res5 block: ResNet-{depth} "
            f"has {num_res5_blocks}."
        )


@BACKBONE_REGISTRY.register()
def build_resnet_deeplab_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """detectron2's ``ResNet`` with the DeepLab stem option, res4 dilation and res5 multi-grid.

    Returns a :class:`ResNet` whose ``forward`` maps B x C x H x W images to ``{name: B x C_name x h x w}``
    for ``MODEL.RESNETS.OUT_FEATURES``; ``output_shape()`` reports the strides after dilation
    (res5: 32, or 16 with ``RES5_DILATION`` 2, or 8 with ``RES4_DILATION`` 2).
    """
    r = cfg.MODEL.RESNETS
    depth = r.DEPTH
    _check_dilations(depth, r.RES4_DILATION, r.RES5_DILATION, list(r.RES5_MULTI_GRID))
    stem = _build_stem(r.STEM_TYPE, input_shape.channels, r.STEM_OUT_CHANNELS, r.NORM)

    num_blocks_per_stage = NUM_BLOCKS_PER_STAGE[depth]
    bottleneck_channels = r.NUM_GROUPS * r.WIDTH_PER_GROUP
    in_channels = r.STEM_OUT_CHANNELS
    out_channels = r.RES2_OUT_CHANNELS
    # Stages after the last requested output would have no gradient; they are not built.
    max_stage_idx = max(STAGE_INDEX[f] for f in r.OUT_FEATURES)
    stages = []
    for idx, stage_idx in enumerate(range(2, max_stage_idx + 1)):
        dilation = {4: r.RES4_DILATION, 5: r.RES5_DILATION}.get(stage_idx, 1)
        first_stride = 1 if idx == 0 or dilation > 1 else 2
        num_blocks = num_blocks_per_stage[idx]
        stage_kwargs = {
            "num_blocks": num_blocks,
            "stride_per_block": [first_stride] + [1] * (num_blocks - 1),
            "in_channels": in_channels,
            "out_channels": out_channels,
            "norm": r.NORM,
            "bottleneck_channels": bottleneck_channels,
            "stride_in_1x1": r.STRIDE_IN_1X1,
            "num_groups": r.NUM_GROUPS,
        }
        if stage_idx == 5:
            stage_kwargs["dilation_per_block"] = [dilation * mg for mg in r.RES5_MULTI_GRID]
        else:
            stage_kwargs["dilation"] = dilation
        if r.DEFORM_ON_PER_STAGE[idx]:
            stage_kwargs["block_class"] = DeformBottleneckBlock
            stage_kwargs["deform_modulated"] = r.DEFORM_MODULATED
            stage_kwargs["deform_num_groups"] = r.DEFORM_NUM_GROUPS
        else:
            stage_kwargs["block_class"] = BottleneckBlock
        stages.append(ResNet.make_stage(**stage_kwargs))
        in_channels = out_channels
        out_channels *= 2
        bottleneck_channels *= 2
    logger.debug(
        "DeepLab ResNet-%d: stem %s, res4 dilation %d, res5 dilations %s",
        depth, r.STEM_TYPE, r.RES4_DILATION, [r.RES5_DILATION * mg for mg in r.RES5_MULTI_GRID],
    )
    return ResNet(stem, stages, out_features=r.OUT_FEATURES).freeze(cfg.MODEL.BACKBONE.FREEZE_AT)
