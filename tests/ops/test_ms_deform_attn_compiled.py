"""Tests of the compiled multi-scale deformable attention op (qsegformers._C): gradients, agreement
with the PyTorch path and a naive loop, empty levels, the multithreaded CPU kernel, half precision, the
torch.library registration and the dispatch (including the fallback when the extension is missing)."""
import contextlib
import importlib
import logging

import pytest
import torch

from qsegformers.ops.ms_deform_attn import compiled_kernel_available, ms_deform_attn, ms_deform_attn_pytorch

from test_ms_deform_attn import _level_start_index, _naive_ms_deform_attn, _random_inputs

# The module (the package attribute of the same name is the re-exported function).
ops_module = importlib.import_module("qsegformers.ops.ms_deform_attn")

requires_compiled = pytest.mark.skipif(
    not compiled_kernel_available("cpu"), reason="qsegformers._C is not built (pip install -e .)"
)

# Mask2Former R50 at a 512 x 512 image: encoder levels at strides 8, 16, 32.
M2F_512_SHAPES = [(64, 64), (32, 32), (16, 16)]


def _compiled(*inputs):
    return ms_deform_attn(*inputs, impl="compiled")


def _forward_backward(fn, inputs, grad_output):
    value, shapes, start, locations, weights = (t.detach().clone() for t in inputs)
    for t in (value, locations, weights):
        t.requires_grad_(True)
    out = fn(value, shapes, start, locations, weights)
    out.backward(grad_output)
    return out.detach(), value.grad, locations.grad, weights.grad


@contextlib.contextmanager
def _intra_op_threads(num_threads):
    """Run the block with ``num_threads`` intra-op (OpenMP) threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@requires_compiled
def test_gradcheck_compiled_kernel_float64():
    # Several levels of different sizes (zero-sized levels excluded), points outside the map.
    value, shapes, start, locations, weights = _random_inputs([(3, 4), (2, 3), (1, 2)], n=2, lq=3, m=2, d=3, p=2)
    assert ((locations < 0) | (locations > 1)).any()
    value.requires_grad_(True)
    locations.requires_grad_(True)
    weights.requires_grad_(True)

    def fn(v, loc, w):
        return _compiled(v, shapes, start, loc, w)

    assert torch.autograd.gradcheck(fn, (value, locations, weights), eps=1e-6, atol=1e-5)


@requires_compiled
def test_compiled_forward_backward_agree_with_naive_loop_and_pytorch_float32():
    inputs = _random_inputs([(4, 5), (2, 3), (1, 1)], n=2, lq=4, m=2, d=4, p=3, dtype=torch.float32, seed=1)
    grad_output = torch.randn(2, 4, 2 * 4, generator=torch.Generator().manual_seed(2))
    compiled = _forward_backward(_compiled, inputs, grad_output)
    pytorch = _forward_backward(ms_deform_attn_pytorch, inputs, grad_output)
    # The naive loop reads locations as Python floats: it differentiates w.r.t. value and weights only.
    naive = _forward_backward(
        lambda v, s, st, loc, w: _naive_ms_deform_attn(v, s, st, loc.detach(), w), inputs, grad_output
    )
    for name, c, p, ref in zip(["output", "value", "locations", "weights"], compiled, pytorch, naive):
        torch.testing.assert_close(c, p, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} vs pytorch: {m}")
        if name != "locations":
            torch.testing.assert_close(c, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} vs naive: {m}")


@requires_compiled
def test_compiled_agrees_with_pytorch_at_mask2former_512_shapes():
    # 8 heads, 4 points, 32 channels per head; queries are all 5376 pixels of the three levels.
    lq = sum(h * w for h, w in M2F_512_SHAPES)
    inputs = _random_inputs(M2F_512_SHAPES, n=1, lq=lq, m=8, d=32, p=4, dtype=torch.float32, seed=3)
    grad_output = torch.randn(1, lq, 8 * 32, generator=torch.Generator().manual_seed(4))
    compiled = _forward_backward(_compiled, inputs, grad_output)
    pytorch = _forward_backward(ms_deform_attn_pytorch, inputs, grad_output)
    reference = _forward_backward(
        ms_deform_attn_pytorch, [t.double() if t.is_floating_point() else t for t in inputs], grad_output.double()
    )
    for name, c, p, ref in zip(["output", "value", "locations", "weights"], compiled, pytorch, reference):
        # Tolerance 1e-5 relative to the tensor's scale: the location gradients reach ~2000 (they scale
        # with the map size), where float32 rounding alone is ~1e-4. Measured: the compiled kernel is
        # within 5e-7 of the float64 result, the PyTorch path within 1.3e-6 (relative to the max).
        atol = 1e-5 * float(ref.abs().max())
        torch.testing.assert_close(c, p, rtol=1e-5, atol=atol, msg=lambda m: f"{name} vs pytorch: {m}")
        torch.testing.assert_close(c.double(), ref, rtol=1e-5, atol=atol, msg=lambda m: f"{name} vs float64: {m}")


@requires_compiled
def test_empty_levels_compiled_kernel_equals_pytorch_path():
    # Levels with H*W == 0 between non-empty ones: the kernel skips their samples (no corner is inside
    # the map), the PyTorch path returns zeros for them. Gradients of their locations and weights are zero.
    inputs = _random_inputs([(4, 5), (0, 3), (2, 0), (0, 0), (1, 2)], n=2, lq=4, m=2, d=3, p=2, seed=8)
    assert inputs[2].tolist() == [0, 20, 20, 20, 20]
    grad_output = torch.randn(2, 4, 2 * 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    compiled = _forward_backward(_compiled, inputs, grad_output)
    pytorch = _forward_backward(ms_deform_attn_pytorch, inputs, grad_output)
    for name, c, p in zip(["output", "value", "locations", "weights"], compiled, pytorch):
        # float64; measured difference <= 7.2e-15 (locations, |grad| ~ 34).
        torch.testing.assert_close(c, p, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
    empty = [1, 2, 3]
    for grads in (compiled, pytorch):
        assert torch.count_nonzero(grads[2][:, :, :, empty]) == 0 and torch.count_nonzero(grads[3][:, :, :, empty]) == 0
    # The non-empty levels do contribute; weight on the empty levels alone gives exact zeros.
    assert torch.count_nonzero(compiled[3][:, :, :, [0, 4]]) > 0
    value, shapes, start, locations, weights = inputs
    weights = weights.clone()
    weights[:, :, :, [0, 4]] = 0
    assert torch.count_nonzero(_compiled(value, shapes, start, locations, weights)) == 0


@requires_compiled
@pytest.mark.parametrize("channels", [32, 5])
def test_compiled_cpu_kernel_with_two_threads_matches_pytorch(channels):
    # The forward splits N*Lq*M = 2*48*4 = 384 (batch, query, head) tasks (grain size 16), the backward
    # N*M = 8 (batch, head) tasks (grain size 1): with 2 threads each thread gets a half. 32 channels run
    # the compile-time channel count, 5 the runtime one.
    inputs = _random_inputs([(8, 9), (4, 5), (2, 3)], n=2, lq=48, m=4, d=channels, p=3, dtype=torch.float32, seed=11)
    grad_output = torch.randn(2, 48, 4 * channels, generator=torch.Generator().manual_seed(12))
    with _intra_op_threads(1):
        one_thread = _forward_backward(_compiled, inputs, grad_output)
    with _intra_op_threads(2):
        assert torch.get_num_threads() == 2
        two_threads = _forward_backward(_compiled, inputs, grad_output)
    pytorch = _forward_backward(ms_deform_attn_pytorch, inputs, grad_output)
    for name, two, one, p in zip(["output", "value", "locations", "weights"], two_threads, one_thread, pytorch):
        # Every task computes the same values whichever thread runs it.
        assert torch.equal(two, one), name
        # Measured: within 4.3e-7 of the PyTorch path, relative to the tensor's max (|grad loc| ~ 150).
        atol = 1e-5 * float(p.abs().max())
        torch.testing.assert_close(two, p, rtol=1e-5, atol=atol, msg=lambda m: f"{name} vs pytorch: {m}")


@requires_compiled
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_float32(dtype):
    inputs = _random_inputs([(6, 7), (3, 4)], n=2, lq=5, m=2, d=8, p=3, dtype=torch.float32, seed=5)
    expected = _compiled(*inputs)
    value, shapes, start, locations, weights = inputs
    half = [value.to(dtype), shapes, start, locations.to(dtype), weights.to(dtype)]
    for i in (0, 3, 4):
        half[i].requires_grad_(True)
    out = _compiled(*half)
    assert out.dtype == dtype
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    out.float().square().sum().backward()
    assert all(half[i].grad.dtype == dtype and torch.isfinite(half[i].grad).all() for i in (0, 3, 4))


@requires_compiled
def test_opcheck():
    value, shapes, start, locations, weights = _random_inputs([(3, 4), (2, 2)], dtype=torch.float32)
    value.requires_grad_(True)
    locations.requires_grad_(True)
    weights.requires_grad_(True)
    torch.library.opcheck(torch.ops.qsegformers.ms_deform_attn.default, (value, shapes, start, locations, weights))


@requires_compiled
def test_jit_trace_sees_one_op():
    inputs = _random_inputs([(3, 4), (2, 2)], dtype=torch.float32)

    def fn(value, locations, weights):
        return ms_deform_attn(value, inputs[1], inputs[2], locations, weights, impl="auto")

    traced = torch.jit.trace(fn, (inputs[0], inputs[3], inputs[4]))
    assert "qsegformers::ms_deform_attn" in str(traced.graph)
    torch.testing.assert_close(traced(inputs[0], inputs[3], inputs[4]), _compiled(*inputs))


@requires_compiled
def test_export_sees_one_op():
    class Core(torch.nn.Module):
        def forward(self, value, spatial_shapes, level_start_index, locations, weights):
            return ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, impl="compiled")

    inputs = _random_inputs([(3, 4), (2, 2)], dtype=torch.float32)
    exported = torch.export.export(Core(), tuple(inputs))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert targets == ["qsegformers.ms_deform_attn.default"]
    torch.testing.assert_close(exported.module()(*inputs), _compiled(*inputs))


def test_auto_falls_back_with_one_warning_when_extension_missing(monkeypatch, caplog):
    monkeypatch.setattr(ops_module, "_compiled_kernel", lambda: None)
    ops_module._warn_fallback_once.cache_clear()
    inputs = _random_inputs([(4, 5), (2, 3)], dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger=ops_module.__name__):
        first = ms_deform_attn(*inputs, impl="auto")
        second = ms_deform_attn(*inputs, impl="auto")
    ops_module._warn_fallback_once.cache_clear()
    warnings = [r for r in caplog.records if "pure-PyTorch" in r.getMessage()]
    assert len(warnings) == 1
    assert "DEFORMABLE_ATTN_IMPL" in warnings[0].getMessage() and "pip install" in warnings[0].getMessage()
    expected = ms_deform_attn_pytorch(*inputs)
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"DEFORMABLE_ATTN_IMPL = 'compiled'.*pip install"):
        ms_deform_attn(*inputs, impl="compiled")


def test_missing_extension_import_is_not_an_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_compiled_extension(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "qsegformers" and fromlist and "_C" in fromlist:
            raise ImportError("simulated: qsegformers._C is not built")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_compiled_extension)
    ops_module._compiled_kernel.cache_clear()
    try:
        assert ops_module._compiled_kernel() is None
        assert not compiled_kernel_available("cpu")
    finally:
        monkeypatch.undo()
        ops_module._compiled_kernel.cache_clear()


@requires_compiled
def test_module_runs_compiled_kernel_on_cpu():
    torch.manual_seed(0)
    module = ops_module.MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2, impl="compiled")
    spatial_shapes = torch.tensor([[4, 4], [2, 2]])
    args = (torch.randn(2, 5, 16), torch.rand(2, 5, 2, 2), torch.randn(2, 20, 16), spatial_shapes,
            _level_start_index(spatial_shapes))
    out = module(*args)
    module.impl = "pytorch"
    torch.testing.assert_close(out, module(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    not (torch.cuda.is_available() and compiled_kernel_available("cuda")), reason="needs a GPU and the CUDA kernel"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_kernel_agrees_with_cpu_kernel(dtype):
    lq = sum(h * w for h, w in M2F_512_SHAPES)
    inputs = _random_inputs(M2F_512_SHAPES, n=1, lq=lq, m=8, d=32, p=4, dtype=torch.float32, seed=6)
    grad_output = torch.randn(1, lq, 8 * 32, generator=torch.Generator().manual_seed(7))
    expected = _forward_backward(_compiled, inputs, grad_output)
    cuda_inputs = [t.cuda().to(dtype) if t.is_floating_point() else t.cuda() for t in inputs]
    actual = _forward_backward(_compiled, cuda_inputs, grad_output.cuda().to(dtype))
    tol = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    for name, a, e in zip(["output", "value", "locations", "weights"], actual, expected):
        assert a.dtype == dtype
        atol = tol * float(e.abs().max())
        torch.testing.assert_close(a.float().cpu(), e, rtol=tol, atol=atol, msg=lambda m: f"{name}: {m}")
