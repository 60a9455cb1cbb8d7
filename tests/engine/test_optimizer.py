"""Tests of qsegformers.engine.optimizer: Mask2Former parameter groups, optimizers, clipping."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d

from qsegformers.config import add_qsegformers_config
from qsegformers.engine.optimizer import FullModelClippedAdamW, build_optimizer

BASE_LR = 1e-2
WEIGHT_DECAY = 0.05
WEIGHT_DECAY_NORM = 0.001
WEIGHT_DECAY_EMBED = 0.002
BACKBONE_MULTIPLIER = 0.1
CLIP_VALUE = 0.01
HUGE_GRAD = 1e6
CHANNELS = 4


class _Backbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, CHANNELS, 3)
        self.bn = torch.nn.BatchNorm2d(CHANNELS)
        self.frozen_bn = FrozenBatchNorm2d(CHANNELS)
        self.relative_position_bias_table = torch.nn.Parameter(torch.zeros(CHANNELS, 2))
        self.absolute_pos_embed = torch.nn.Parameter(torch.zeros(1, CHANNELS))
        self.frozen = torch.nn.Linear(CHANNELS, CHANNELS)
        self.frozen.requires_grad_(False)


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = _Backbone()
        self.proj = torch.nn.Linear(CHANNELS, CHANNELS)
        self.ln = torch.nn.LayerNorm(CHANNELS)
        self.gn = torch.nn.GroupNorm(2, CHANNELS)
        self.inorm = torch.nn.InstanceNorm2d(CHANNELS, affine=True)
        self.query_embed = torch.nn.Embedding(3, CHANNELS)
        self.shared_proj = self.proj  # the same module under two names
        self.tied = torch.nn.Linear(CHANNELS, CHANNELS, bias=False)
        self.tied.weight = self.proj.weight  # a parameter shared by two modules


def _cfg(**solver):
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.SOLVER.BASE_LR = BASE_LR
    cfg.SOLVER.WEIGHT_DECAY = WEIGHT_DECAY
    cfg.SOLVER.WEIGHT_DECAY_NORM = WEIGHT_DECAY_NORM
    cfg.SOLVER.WEIGHT_DECAY_EMBED = WEIGHT_DECAY_EMBED
    cfg.SOLVER.BACKBONE_MULTIPLIER = BACKBONE_MULTIPLIER
    for key, value in solver.items():
        node, _, leaf = key.rpartition(".")
        setattr(cfg.SOLVER if not node else getattr(cfg.SOLVER, node), leaf, value)
    return cfg


def _hyperparams(optimizer):
    """id(param) -> (lr, weight_decay), checking that no parameter is in two groups."""
    result = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in result, "a parameter is optimized twice"
            result[id(p)] = (group["lr"], group["weight_decay"])
    return result


def test_param_groups_lr_and_weight_decay():
    model = _Model()
    hp = _hyperparams(build_optimizer(_cfg(), model))
    bb = model.backbone
    backbone_lr = BASE_LR * BACKBONE_MULTIPLIER
    expected = {
        bb.conv.weight: (backbone_lr, WEIGHT_DECAY),
        bb.conv.bias: (backbone_lr, WEIGHT_DECAY),
        bb.bn.weight: (backbone_lr, WEIGHT_DECAY_NORM),
        bb.bn.bias: (backbone_lr, WEIGHT_DECAY_NORM),
        bb.relative_position_bias_table: (backbone_lr, 0.0),
        bb.absolute_pos_embed: (backbone_lr, 0.0),
        model.proj.weight: (BASE_LR, WEIGHT_DECAY),
        model.proj.bias: (BASE_LR, WEIGHT_DECAY),
        model.ln.weight: (BASE_LR, WEIGHT_DECAY_NORM),
        model.gn.bias: (BASE_LR, WEIGHT_DECAY_NORM),
        model.inorm.weight: (BASE_LR, WEIGHT_DECAY_NORM),
        model.query_embed.weight: (BASE_LR, WEIGHT_DECAY_EMBED),
    }
    for param, (lr, wd) in expected.items():
        assert hp[id(param)] == pytest.approx((lr, wd))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(hp) == trainable  # every trainable parameter once; frozen ones left out
    assert id(bb.frozen.weight) not in hp


def test_sgd_uses_momentum_and_nesterov():
    optimizer = build_optimizer(_cfg(OPTIMIZER="SGD", MOMENTUM=0.8, NESTEROV=True), _Model())
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.defaults["momentum"] == 0.8 and optimizer.defaults["nesterov"]


def test_full_model_clipping_bounds_the_total_grad_norm():
    cfg = _cfg(
        OPTIMIZER="ADAMW",
        **{"CLIP_GRADIENTS.ENABLED": True, "CLIP_GRADIENTS.CLIP_TYPE": "full_model",
           "CLIP_GRADIENTS.CLIP_VALUE": CLIP_VALUE},
    )
    model = _Model()
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, FullModelClippedAdamW)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.full_like(p, HUGE_GRAD)
    optimizer.step()
    # The grads the optimizer applied were clipped in place, over all parameters together.
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    assert total.item() <= CLIP_VALUE * (1 + 1e-4)
    assert total.item() == pytest.approx(CLIP_VALUE, rel=1e-4)
    assert len(optimizer.state) == len(params)


def test_value_clipping_uses_detectron2():
    cfg = _cfg(
        OPTIMIZER="SGD",
        **{"CLIP_GRADIENTS.ENABLED": True, "CLIP_GRADIENTS.CLIP_TYPE": "value",
           "CLIP_GRADIENTS.CLIP_VALUE": CLIP_VALUE},
    )
    model = _Model()
    optimizer = build_optimizer(cfg, model)
    assert "WithGradientClip" in type(optimizer).__name__
    for p in model.parameters():
        p.grad = torch.full_like(p, HUGE_GRAD)
    optimizer.step()
    assert all(p.grad.abs().max().item() <= CLIP_VALUE for p in model.parameters() if p.requires_grad)


def test_unknown_optimizer_names_the_key():
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER.*'LAMB'"):
        build_optimizer(_cfg(OPTIMIZER="LAMB"), _Model())


def test_unknown_clip_type_names_the_key():
    cfg = _cfg(**{"CLIP_GRADIENTS.ENABLED": True, "CLIP_GRADIENTS.CLIP_TYPE": "layerwise"})
    with pytest.raises(ValueError, match="SOLVER.CLIP_GRADIENTS.CLIP_TYPE.*'layerwise'"):
        build_optimizer(cfg, _Model())
