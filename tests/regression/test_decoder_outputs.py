"""Behaviour lock for the decoder refactors (issue 17): every decoder x task case of ``decoder_cases.CASES``,
rebuilt and rerun, reproduces its recording in ``recorded/`` (written by ``record_decoder_outputs.py``, whose
docstring says when re-recording is allowed): the same keys, the losses, the gradient norm of every parameter,
a few full gradients, the head outputs of every layer and the semantic / panoptic / instance results.

Tolerances. Rerunning a case on the recording machine (CPU, OMP_NUM_THREADS=1) reproduces every value bit for
bit (observed difference 0). As a proxy for another BLAS / CPU of the same kind, the cases were also rerun
with 2 threads (other reduction orders); the bounds are >= 10x the differences seen there:
* float tensors (head outputs, sem_seg, instance scores): |a - e| <= TENSOR_RTOL * |e| + TENSOR_ATOL * max|e|
  (2 threads: max |a - e| / max|e| = 6e-6, on FASeg's mask logits);
* losses: relative LOSS_RTOL (2 threads: 1.9e-6);
* gradient norms: |a - e| <= GRAD_RTOL * |e| + GRAD_ATOL * (largest gradient norm of the case) (2 threads:
  1.6e-6 of the largest; parameters whose exact gradient is 0, e.g. attention key biases, carry rounding
  noise only, hence the absolute part);
* full gradients: as float tensors, with GRAD_RTOL / FULL_GRAD_ATOL (2 threads: 1.5e-5 of max|e|, FASeg's
  query features: their gradient crosses every layer and the point-sampled losses).
Discrete outputs (panoptic ids, segments_info, instance masks, boxes and classes, which losses / gradients
exist) are compared exactly; with 2 threads none of them changed. The pure-PyTorch deformable attention
(``DEFORMABLE_ATTN_IMPL = "pytorch"``, what "auto" falls back to without the compiled ``qsegformers._C``) also
stays within a tenth of every bound.
"""
import math
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decoder_cases  # noqa: E402
from decoder_cases import CASES, check_not_degenerate, recording_path, run_case  # noqa: E402

TENSOR_RTOL = 1e-5
TENSOR_ATOL = 1e-4  # times the largest |value| of the recorded tensor
LOSS_RTOL = 2e-5
GRAD_RTOL = 1e-4
GRAD_ATOL = 2e-5  # times the largest recorded gradient norm of the case
FULL_GRAD_ATOL = 2e-4  # times the largest |value| of the recorded gradient
# Float tensors holding discrete values: compared exactly.
EXACT_FLOAT_SUFFIXES = (".pred_boxes",)
RECORD_COMMAND = ".venv/bin/python tests/regression/record_decoder_outputs.py"


def load_recording(case) -> Dict[str, object]:
    path = recording_path(case)
    if not path.exists():
        pytest.fail(f"{path} is missing: record it with `{RECORD_COMMAND} {case.name}` (see that script's docstring)")
    recording = torch.load(path, weights_only=False)
    assert recording["case"] == case.name and recording["opts"] == list(case.opts), (
        f"{path} was recorded for another definition of case {case.name!r}: re-record it with "
        f"`{RECORD_COMMAND} {case.name}`")
    return recording["record"]


def _tensor_mismatch(key: str, actual, expected: Tensor, rtol: float, atol_frac: float):
    if not isinstance(actual, Tensor):
        return f"{key}: expected a tensor, got {type(actual).__name__}"
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return f"{key}: {actual.dtype} {tuple(actual.shape)} != recorded {expected.dtype} {tuple(expected.shape)}"
    if not expected.is_floating_point() or key.endswith(EXACT_FLOAT_SUFFIXES):
        if not torch.equal(actual, expected):
            return f"{key}: {int((actual != expected).sum())} of {expected.numel()} values differ (compared exactly)"
        return None
    finite = torch.isfinite(expected)
    if not torch.equal(finite, torch.isfinite(actual)) or not torch.equal(actual[~finite], expected[~finite]):
        return f"{key}: the non-finite entries differ"
    a, e = actual[finite].double(), expected[finite].double()
    if e.numel() == 0:
        return None
    allowed = rtol * e.abs() + atol_frac * e.abs().max()
    err = (a - e).abs()
    if (err > allowed).any():
        worst = int((err - allowed).argmax())
        return (f"{key}: {int((err > allowed).sum())} of {e.numel()} values off, worst {a[worst]:.7g} vs recorded "
                f"{e[worst]:.7g} (max |diff| {err.max():.3g}, max |recorded| {e.abs().max():.3g})")
    return None


REPORT_ORDER = ("component.", "loss.", "head.", "result.", "grad_norm.", "grad.")  # most telling first


def _report_order(key: str):
    return next((i for i, p in enumerate(REPORT_ORDER) if key.startswith(p)), len(REPORT_ORDER)), key


def mismatches(actual: Dict[str, object], expected: Dict[str, object]) -> List[str]:
    """Every difference between a rerun record and the recorded one, beyond the tolerances above."""
    out = []
    missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    if missing:
        out.append(f"keys no longer produced: {missing}")
    if extra:
        out.append(f"new keys: {extra}")
    norms = [v for k, v in expected.items() if k.startswith("grad_norm.") and v is not None]
    max_norm = max(norms, default=0.0)
    for key in sorted(set(expected) & set(actual), key=_report_order):
        e, a = expected[key], actual[key]
        if isinstance(e, Tensor):
            grad = key.startswith("grad.")
            problem = _tensor_mismatch(key, a, e, GRAD_RTOL if grad else TENSOR_RTOL,
                                       FULL_GRAD_ATOL if grad else TENSOR_ATOL)
        elif isinstance(e, float) and key.startswith("loss."):
            ok = isinstance(a, float) and math.isclose(a, e, rel_tol=LOSS_RTOL, abs_tol=0.0)
            problem = None if ok else f"{key}: {a!r} vs recorded {e!r} (rtol {LOSS_RTOL})"
        elif isinstance(e, float) and key.startswith("grad_norm."):
            ok = isinstance(a, float) and abs(a - e) <= GRAD_RTOL * abs(e) + GRAD_ATOL * max_norm
            problem = None if ok else f"{key}: {a!r} vs recorded {e!r}"
        else:  # component names, None (no gradient), counts, image sizes, segments_info: exactly
            problem = None if a == e else f"{key}: {a!r} vs recorded {e!r}"
        if problem:
            out.append(problem)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_reproduces_its_recording(case):
    expected = load_recording(case)
    assert check_not_degenerate(case, expected) == []
    problems = mismatches(run_case(case), expected)
    assert not problems, (
        f"{case.name} no longer reproduces {recording_path(case).name} ({len(problems)} differences):\n  "
        + "\n  ".join(problems[:30])
        + f"\nIf (and only if) this change of behaviour is intended, re-record with `{RECORD_COMMAND} {case.name}` "
        "and say so in the commit message."
    )


@pytest.mark.parametrize("task", ["semantic", "panoptic", "instance"])
def test_mp_former_inference_is_mask2formers(task):
    """MP-Former changes training only: with the same (name-keyed) weights, its recorded inference equals
    Mask2Former's, value for value, while its recorded losses add the MP terms."""
    m2f = load_recording(decoder_cases.CASES_BY_NAME[f"mask2former_{task}"])
    mp = load_recording(decoder_cases.CASES_BY_NAME[f"mp_former_{task}"])
    inference = [k for k in m2f if k.startswith(("head.", "result."))]
    assert inference and [k for k in mp if k.startswith(("head.", "result."))] == inference
    for key in inference:
        if isinstance(m2f[key], Tensor):
            assert torch.equal(mp[key], m2f[key]), key
        else:
            assert mp[key] == m2f[key], key
    mp_terms = {k for k in mp if k.startswith("loss.")} - {k for k in m2f if k.startswith("loss.")}
    assert mp_terms and all("_mp" in k for k in mp_terms)


def test_cases_cover_every_registered_decoder_and_pixel_decoder():
    """A decoder or pixel decoder registered without a recorded case would be refactored unchecked; and every
    file in recorded/ belongs to a case."""
    from qsegformers.registries import PIXEL_DECODER_REGISTRY, TRANSFORMER_DECODER_REGISTRY

    recorded = [load_recording(case) for case in CASES]
    decoders = {r["component.decoder"] for r in recorded}
    pixel_decoders = {r["component.pixel_decoder"] for r in recorded}
    how = "add a case to tests/regression/decoder_cases.py and record it"
    unrecorded = {name for name, _ in TRANSFORMER_DECODER_REGISTRY} - decoders
    assert unrecorded == set(), f"transformer decoders without a recorded case: {sorted(unrecorded)}; {how}"
    unrecorded = {name for name, _ in PIXEL_DECODER_REGISTRY} - pixel_decoders
    assert unrecorded == set(), f"pixel decoders without a recorded case: {sorted(unrecorded)}; {how}"
    tasks = {(r["component.decoder"], c.task) for r, c in zip(recorded, CASES)}
    for task in ("semantic", "panoptic", "instance"):
        assert ("MultiScaleMaskedTransformerDecoder", task) in tasks and ("MPMaskedTransformerDecoder", task) in tasks
    assert sorted(p.name for p in decoder_cases.RECORDED_DIR.glob("*.pt")) == sorted(
        recording_path(c).name for c in CASES)
