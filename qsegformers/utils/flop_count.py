"""Parameters, FLOPs and activations of a MaskFormer-style model, per top-level part (``tools/analyze_model.py``).

FLOPs follow fvcore's convention (one fused multiply-add = one FLOP, as in the Mask2Former paper's
numbers) and detectron2's: elementwise and reduction ops (add, mul, softmax, sigmoid, ...) count 0.
Nothing is dropped silently: :class:`ModelCost` lists every op that counted 0 by that convention and
every op fvcore has no handle for, with the number of calls.

Handles added here (custom ops and the deformable attention's PyTorch path):

* ``qsegformers::ms_deform_attn`` (compiled multi-scale deformable attention): value N x S x M x D,
  sampling locations N x Lq x M x L x P x 2 -> ``4 * N * Lq * M * L * P * D``: a bilinear sample of a
  D-vector costs 4 multiply-adds per channel. The attention-weighted sum of the samples is elementwise
  (0 by convention), so the compiled op and the pure-PyTorch path (``grid_sample`` per level, then
  mul + sum) count the same.
* ``aten::scaled_dot_product_attention`` (what ``nn.MultiheadAttention`` runs in recent torch; older
  torch ran two ``bmm`` that fvcore counts): query ... x L x E, key ... x S x E, value ... x S x Ev ->
  ``prod(...) * L * S * (E + Ev)``, the two matrix products; the softmax is elementwise (0).
* ``aten::grid_sampler``: input N x C x H_in x W_in, output N x C x H_out x W_out ->
  ``k * N * C * H_out * W_out`` with k = 4 (bilinear), 0 (nearest: a copy), 16 (bicubic).
"""
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List

import torch
from fvcore.nn import ActivationCountAnalysis, FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

from ..d2_compat import import_export

TracingAdapter = import_export().TracingAdapter
# detectron2's list of elementwise/reduction ops counted as 0 FLOPs (importable once export is registered).
from detectron2.utils.analysis import _IGNORED_OPS as ELEMENTWISE_OPS  # noqa: E402

__all__ = [
    "PARTS",
    "ModelCost",
    "analyze_model_cost",
    "grid_sampler_flop_jit",
    "ms_deform_attn_flop_jit",
    "sdpa_flop_jit",
]

# Top-level parts of a MaskFormer: table row name -> module path ("" = the whole model).
PARTS: Dict[str, str] = {
    "backbone": "backbone",
    "pixel decoder": "sem_seg_head.pixel_decoder",
    "transformer decoder": "sem_seg_head.predictor",
}
TOTAL = "total"
OTHER = "other (inference post-processing)"
BILINEAR_CORNERS = 4  # multiply-adds per channel of one bilinear sample
# aten::grid_sampler interpolation_mode argument -> multiply-adds per output element.
GRID_SAMPLER_MODE_FLOPS = {0: BILINEAR_CORNERS, 1: 0, 2: 16}  # bilinear, nearest, bicubic (4 x 4 taps)
MS_DEFORM_ATTN_OP = "qsegformers::ms_deform_attn"
GRID_SAMPLER_OP = "aten::grid_sampler"
SDPA_OP = "aten::scaled_dot_product_attention"
_TRACED_PREFIX = "model."  # TracingAdapter keeps the model under this attribute


def _prod(shape: List[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def ms_deform_attn_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """FLOPs of ``qsegformers::ms_deform_attn(value, shapes, start, locations, weights)``: 4 * N*Lq*M*L*P*D."""
    n, _, m, d = get_shape(inputs[0])
    _, lq, _, levels, points, _ = get_shape(inputs[3])
    return BILINEAR_CORNERS * n * lq * m * levels * points * d


def grid_sampler_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """FLOPs of ``aten::grid_sampler(input, grid, mode, padding, align_corners)``: k * output numel."""
    mode = inputs[2].toIValue()
    if mode not in GRID_SAMPLER_MODE_FLOPS:
        raise ValueError(f"aten::grid_sampler with unknown interpolation mode {mode!r}")
    return GRID_SAMPLER_MODE_FLOPS[mode] * _prod(get_shape(outputs[0]))


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """FLOPs of ``scaled_dot_product_attention(q, k, v, ...)``: prod(batch) * L * S * (E + Ev)."""
    *batch, length, e = get_shape(inputs[0])
    source = get_shape(inputs[1])[-2]
    e_v = get_shape(inputs[2])[-1]
    return _prod(batch) * length * source * (e + e_v)


@dataclass
class ModelCost:
    """Counts per part (the keys of :data:`PARTS`, plus ``OTHER`` and ``TOTAL``).

    ``zero_flop_ops``: op -> calls counted as 0 FLOPs by detectron2's elementwise convention;
    ``unsupported_ops``: op -> calls fvcore has no FLOP handle for (not counted).
    """

    params: Dict[str, int]
    flops: Dict[str, float]
    activations: Dict[str, float]
    input_size: List[int]
    zero_flop_ops: Dict[str, int] = field(default_factory=dict)
    unsupported_ops: Dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> Dict:
        return {
            "input_size": self.input_size,
            "params": self.params,
            "flops": self.flops,
            "activations": self.activations,
            "zero_flop_ops": self.zero_flop_ops,
            "unsupported_ops": self.unsupported_ops,
        }


def _recording_zero_handle(name: str, calls: Counter):
    def handle(inputs, outputs) -> int:
        calls[name] += 1
        return 0

    return handle


def _per_part(by_module: Dict[str, float], prefix: str) -> Dict[str, float]:
    out = {part: float(by_module.get(prefix + path, 0)) for part, path in PARTS.items()}
    total = float(by_module.get(prefix.rstrip("."), 0))
    out[OTHER] = total - sum(out.values())
    out[TOTAL] = total
    return out


def _param_counts(model: nn.Module) -> Dict[str, int]:
    modules = dict(model.named_modules())
    out = {part: sum(p.numel() for p in modules[path].parameters()) if path in modules else 0
           for part, path in PARTS.items()}
    total = sum(p.numel() for p in model.parameters())
    out[OTHER] = total - sum(out.values())
    out[TOTAL] = total
    return out


def analyze_model_cost(model: nn.Module, image: torch.Tensor) -> ModelCost:
    """Count the cost of ``model`` (a MaskFormer in eval mode) on one image.

    Args:
        image: 3 x H x W float image in 0-255, in the model's input format (it is normalised and padded
            to the size divisibility by the model, as in inference).
    """
    inputs = [{"image": image.to(model.device)}]
    adapter = TracingAdapter(model, inputs, allow_non_tensor=True)
    zero_calls: Counter = Counter()
    with warnings.catch_warnings():
        # Tracing warns wherever a tensor value becomes a Python number (shapes, thresholds); the trace
        # is only read for op shapes here, so these warnings carry no information.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        flops = FlopCountAnalysis(adapter, adapter.flattened_inputs)
        flops.set_op_handle(**{op: _recording_zero_handle(op, zero_calls) for op in ELEMENTWISE_OPS})
        flops.set_op_handle(**{
            MS_DEFORM_ATTN_OP: ms_deform_attn_flop_jit,
            GRID_SAMPLER_OP: grid_sampler_flop_jit,
            SDPA_OP: sdpa_flop_jit,
        })
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        flop_by_module = flops.by_module()
        unsupported = dict(flops.unsupported_ops())
        acts = ActivationCountAnalysis(adapter, adapter.flattened_inputs)
        acts.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        act_by_module = acts.by_module()
    return ModelCost(
        params=_param_counts(model),
        flops=_per_part(flop_by_module, _TRACED_PREFIX),
        activations=_per_part(act_by_module, _TRACED_PREFIX),
        input_size=list(image.shape[-2:]),
        zero_flop_ops=dict(sorted(zero_calls.items())),
        unsupported_ops=dict(sorted(unsupported.items())),
    )
