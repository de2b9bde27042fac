"""The fused native CPU kernel against the torch-ops kernel it replaces in eager mode (kernel.py's general tensor
path, itself checked against torch's fused learnable kernels in test_fake_quant.py) and against the plain formula:
identical values and input gradients, step/offset gradients equal to rounding; its build and fallback.

Eager mode reaches the C passes two ways, and the equality tests run both: the op ``fxquant::fake_quantize_eager``
(C++ autograd node, the default) and, where that op cannot be built, the ctypes library under a Python
autograd.Function (``FXQUANT_NATIVE_OP=0``)."""

import contextlib
import copy
import ctypes
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxquant
from fxquant.quant import kernel as kernels
from fxquant.quant import native_build
from fxquant.quant.kernel import fake_quantize
from fxquant.quant.quantizers import integer_range

from .strategies import INPUT_SHAPE, models, recipes, rounding_ties

needs_native = pytest.mark.skipif(
    native_build.native_library() is None, reason="no C compiler here: the torch-ops kernel is used instead"
)
needs_op = pytest.mark.skipif(
    native_build.native_eager_op() is None, reason="no C++ compiler here: eager mode calls the C kernel by ctypes"
)
EAGER_PATHS = [pytest.param("op", marks=needs_op), "ctypes"]


@contextlib.contextmanager
def eager_path(path):
    """Eager quantizers call the C passes by ``path``: "op" (fxquant::fake_quantize_eager) or "ctypes"."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FXQUANT_NATIVE_OP", "1" if path == "op" else "0")
        yield


def native_path(y):
    """How the C passes made ``y``: "op", "ctypes", or None (another kernel)."""
    name = "" if y.grad_fn is None else y.grad_fn.name()
    if name.endswith("FakeQuantizeFunction>"):  # torch::autograd::CppNode<(anonymous namespace)::FakeQuantizeFunction>
        return "op"
    return "ctypes" if name == "NativeFakeQuantizeBackward" else None


def general(x, scale, zero_point, qmin, qmax, ch_axis, grad_factor):
    return kernels._FakeQuantize.apply(x, scale, zero_point, qmin, qmax, ch_axis, grad_factor)


def run(kernel, x, scale, zero_point, qmin, qmax, ch_axis, upstream, grad_factor=0.37):
    xs, ss = x.clone().requires_grad_(), scale.clone().requires_grad_()
    zs = None if zero_point is None else zero_point.clone().requires_grad_()
    y = kernel(xs, ss, zs, qmin, qmax, ch_axis, grad_factor)
    (y * upstream).sum().backward()
    return y.detach(), xs.grad, ss.grad, None if zs is None else zs.grad


def uses_native(x, scale, zero_point, qmin, qmax, ch_axis, path=None):
    """Whether fake_quantize takes the C passes here (by ``path`` when given)."""
    y = fake_quantize(x.clone().requires_grad_(), scale.clone().requires_grad_(), zero_point, qmin, qmax, ch_axis)
    return native_path(y) is not None if path is None else native_path(y) == path


def assert_same(native, reference, magnitude):
    (y, gx, gs, gz), (y_ref, gx_ref, gs_ref, gz_ref) = native, reference
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0, equal_nan=True)
    # the step gradient is Σg·level − Σg_x·x/s: float32 rounding is relative to the terms, not their difference
    torch.testing.assert_close(gs, gs_ref, rtol=1e-4, atol=1e-6 * magnitude)
    if gz_ref is not None:
        torch.testing.assert_close(gz, gz_ref, rtol=1e-4, atol=1e-6 * magnitude)


def magnitude_of(x, scale, upstream, qmin, qmax, ch_axis):
    shape = [1] * x.dim()
    if ch_axis is not None:
        shape[ch_axis] = -1
    return float((upstream.abs() * (x.abs() / scale.reshape(shape) + max(-qmin, qmax))).sum()) + 1.0


@needs_native
@pytest.mark.parametrize("path", EAGER_PATHS)
@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    signed=st.booleans(),
    with_offset=st.booleans(),
    ties=st.booleans(),
    elements=st.sampled_from([1, 7, 8, 9, 100, 2049, 70_001]),  # lane tails, block edges, split across threads
    threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 10_000),
)
def test_per_tensor_equals_the_torch_ops_kernel(path, bits, signed, with_offset, ties, elements, threads, seed):
    torch.manual_seed(seed)
    qmin, qmax = integer_range(bits, signed)
    zero_point = torch.tensor([float(torch.randint(qmin, qmax + 1, ()))]) if with_offset else None
    if ties:
        scale, x = rounding_ties(qmin, qmax, zero_point, elements)
    else:
        scale = torch.rand(1) + 0.05
        x = torch.randn(elements) * 3
    upstream = torch.randn_like(x)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with eager_path(path):
            assert uses_native(x, scale, zero_point, qmin, qmax, None, path)
            native = run(fake_quantize, x, scale, zero_point, qmin, qmax, None, upstream)
    finally:
        torch.set_num_threads(previous)
    reference = run(general, x, scale, zero_point, qmin, qmax, None, upstream)
    assert_same(native, reference, magnitude_of(x, scale, upstream, qmin, qmax, None))
    # and the plain formula: the input gradient passes where round(x/s) + z lies in [Qn, Qp]
    z = 0.0 if zero_point is None else float(zero_point)
    levels = torch.round(x * (1.0 / scale)) + z
    torch.testing.assert_close(native[0], (levels.clamp(qmin, qmax) - z) * scale, rtol=0, atol=0)
    torch.testing.assert_close(native[1], upstream * ((levels >= qmin) & (levels <= qmax)), rtol=0, atol=0)


@needs_native
@pytest.mark.parametrize("path", EAGER_PATHS)
@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    channels=st.integers(1, 40),
    inner=st.sampled_from([1, 3, 8, 27, 600, 4000]),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 10_000),
)
def test_per_channel_equals_the_torch_ops_kernel(path, bits, channels, inner, threads, seed):
    """Weights: one step per output channel (axis 0), symmetric, contiguous."""
    torch.manual_seed(seed)
    qmin, qmax = integer_range(bits, True)
    x = torch.randn(channels, inner) * (torch.rand(channels, 1) * 3 + 0.1)
    scale = torch.rand(channels) * 0.5 + 1e-3
    scale[0] = 1e-12  # below MIN_STEP: both kernels clamp it
    upstream = torch.randn_like(x)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with eager_path(path):
            assert uses_native(x, scale, None, qmin, qmax, 0, path)
            native = run(fake_quantize, x, scale, None, qmin, qmax, 0, upstream)
    finally:
        torch.set_num_threads(previous)
    reference = run(general, x, scale, None, qmin, qmax, 0, upstream)
    assert_same(native, reference, magnitude_of(x, scale.clamp(min=1e-8), upstream, qmin, qmax, 0))


@needs_native
@pytest.mark.parametrize("path", EAGER_PATHS)
@settings(max_examples=50, deadline=None)
@given(
    bits=st.integers(2, 8),
    signed=st.booleans(),
    with_offset=st.booleans(),
    input_range=st.sampled_from([(0.0, float("inf")), (0.0, 6.0), (-1.0, 1.0), (-0.3, 2.5)]),
    elements=st.sampled_from([1, 9, 2049, 70_001]),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 10_000),
)
def test_a_fused_input_clamp_equals_hardtanh_then_the_torch_ops_kernel(
    path, bits, signed, with_offset, input_range, elements, threads, seed
):
    """fake_quantize(x, input_range=(lo, hi)) on the native kernel is F.hardtanh(x, lo, hi) followed by the
    torch-ops kernel: the same values and input gradient (zero at the bounds themselves, as hardtanh's), the step
    and offset gradients of a quantizer that reads the clamped tensor."""
    torch.manual_seed(seed)
    qmin, qmax = integer_range(bits, signed)
    zero_point = torch.tensor([float(torch.randint(qmin, qmax + 1, ()))]) if with_offset else None
    scale = torch.rand(1) * 0.3 + 0.02
    x = torch.randn(elements) * 4
    low, high = input_range
    x[: elements // 3] = torch.tensor([low, high if high < float("inf") else 1.0])[
        torch.randint(0, 2, (elements // 3,))
    ]
    upstream = torch.randn_like(x)

    def fused(xs, ss, zs, qmin, qmax, ch_axis, grad_factor):
        return fake_quantize(xs, ss, zs, qmin, qmax, ch_axis, grad_factor, input_range)

    def reference_kernel(xs, ss, zs, qmin, qmax, ch_axis, grad_factor):
        return general(torch.nn.functional.hardtanh(xs, low, high), ss, zs, qmin, qmax, ch_axis, grad_factor)

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with eager_path(path):
            native = run(fused, x, scale, zero_point, qmin, qmax, None, upstream)
            assert uses_native(x, scale, zero_point, qmin, qmax, None, path)
    finally:
        torch.set_num_threads(previous)
    reference = run(reference_kernel, x, scale, zero_point, qmin, qmax, None, upstream)
    assert_same(native, reference, magnitude_of(x.clamp(low, high), scale, upstream, qmin, qmax, None))
    # the torch-ops path of fake_quantize applies the clamp as its own op: the same again
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FXQUANT_NATIVE_KERNEL", "0")
        torch_ops = run(fused, x, scale, zero_point, qmin, qmax, None, upstream)
    assert_same(torch_ops, reference, magnitude_of(x.clamp(low, high), scale, upstream, qmin, qmax, None))


@needs_native
@pytest.mark.parametrize("path", EAGER_PATHS)
def test_nan_and_infinite_inputs_are_handled_like_the_torch_ops_kernel(path):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.3, -0.2, 5.0] * 3)
    upstream = torch.tensor([1.0, float("nan"), 2.0, 3.0, float("nan"), 4.0] * 3)
    scale = torch.tensor([0.1])
    with eager_path(path):
        assert uses_native(x, scale, None, -8, 7, None, path)
        native = run(fake_quantize, x, scale, None, -8, 7, None, upstream)
    reference = run(general, x, scale, None, -8, 7, None, upstream)
    torch.testing.assert_close(native[0], reference[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(native[1], reference[1], rtol=0, atol=0, equal_nan=True)


@needs_native
def test_other_layouts_take_the_torch_ops_kernel_with_the_same_result():
    x = torch.randn(6, 5, 4).transpose(0, 2)  # not contiguous
    scale = torch.tensor([0.2])
    assert not uses_native(x, scale, None, -8, 7, None)
    assert not uses_native(torch.randn(4, 6), torch.rand(6) + 0.1, None, -8, 7, 1)  # channel axis 1
    offsets = torch.zeros(4)
    assert not uses_native(torch.randn(4, 6), torch.rand(4) + 0.1, offsets, -8, 7, 0)  # per-channel offsets
    upstream = torch.randn_like(x)
    torch.testing.assert_close(
        run(fake_quantize, x, scale, None, -8, 7, None, upstream)[1],
        run(general, x, scale, None, -8, 7, None, upstream)[1],
        rtol=0,
        atol=0,
    )


@needs_native
@pytest.mark.parametrize("path", EAGER_PATHS)
def test_only_the_input_and_the_step_are_saved_for_backward(path):
    x = torch.randn(64, 32, requires_grad=True)
    scale = torch.tensor([0.1], requires_grad=True)
    saved = []
    with eager_path(path), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fake_quantize(x, scale, None, -8, 7)
    assert native_path(y) == path
    assert [t.data_ptr() for t in saved] == [x.data_ptr(), scale.data_ptr()]


@needs_native
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=models(), recipe=recipes(bits=st.sampled_from([2, 3, 4, 8])), seed=st.integers(0, 1000))
def test_generated_models_see_the_same_forward_and_gradients_with_either_kernel(model, recipe, seed, monkeypatch):
    """End to end on a prepared model: the same output and input gradient, bit for bit, and the same parameter
    gradients to rounding, whichever kernel the quantizers call."""
    torch.manual_seed(seed)
    x = torch.randn(INPUT_SHAPE)
    qmodel = fxquant.prepare_qat(model, recipe, x[:1])
    fxquant.calibrate(qmodel, x)
    results = []
    # the op, the ctypes library, the torch-ops kernel (the reference, last)
    for kernel_switch, op_switch in (("1", "1"), ("1", "0"), ("0", "1")):
        monkeypatch.setenv("FXQUANT_NATIVE_KERNEL", kernel_switch)
        monkeypatch.setenv("FXQUANT_NATIVE_OP", op_switch)
        qmodel.zero_grad(set_to_none=True)
        xs = x.clone().requires_grad_()
        out = qmodel(xs)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads = {name: p.grad.clone() for name, p in qmodel.named_parameters() if p.grad is not None}
        results.append((out.detach(), xs.grad, grads))
    *natives, (out_ref, gx_ref, grads_ref) = results
    for out, gx, grads in natives:
        torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
        torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)
        assert grads.keys() == grads_ref.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-3, atol=1e-4, msg=name)


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("FXQUANT_NATIVE_KERNEL", "0")
    assert native_build.native_library() is None and native_build.native_eager_op() is None
    x = torch.randn(10, requires_grad=True)
    y = fake_quantize(x, torch.tensor([0.1], requires_grad=True), None, -8, 7)
    assert native_path(y) is None


@needs_native
def test_the_op_alone_is_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("FXQUANT_NATIVE_OP", "off")
    assert native_build.native_eager_op() is None and native_build.native_library() is not None
    y = fake_quantize(torch.randn(10, requires_grad=True), torch.tensor([0.1], requires_grad=True), None, -8, 7)
    assert native_path(y) == "ctypes"


@pytest.mark.parametrize(
    "variable, language, build",
    [("CC", "C", "_built_library"), ("CXX", "C\\+\\+", "_built_op_library")],  # the C library, the eager op
)
def test_a_missing_compiler_is_reported_in_one_line(variable, language, build, monkeypatch, tmp_path):
    monkeypatch.setenv("FXQUANT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(variable, "no-such-compiler-fxq")
    with pytest.raises(native_build.NativeKernelUnavailable, match=f"no {language} compiler: 'no-such-compiler-fxq'"):
        getattr(native_build, build)()
    assert list(tmp_path.iterdir()) == []


def test_a_failing_build_is_reported_with_the_compilers_message(monkeypatch, tmp_path):
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fakecc 1.0; exit 0; fi\n"
                    "echo 'fake_quant.c:1: error: broken' >&2; exit 1\n")  # fmt: skip
    fake.chmod(0o755)
    monkeypatch.setenv("FXQUANT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(fake))
    with pytest.raises(native_build.NativeKernelUnavailable, match=r"could not compile .*error: broken"):
        native_build._built_library()
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written library left behind


@needs_native
def test_the_cache_key_follows_the_source(monkeypatch, tmp_path):
    monkeypatch.setenv("FXQUANT_CACHE_DIR", str(tmp_path))
    first = native_build._built_library()
    assert first.exists() and first.parent == tmp_path
    assert native_build._built_library() == first  # reused, not rebuilt
    monkeypatch.setattr(native_build, "_source_bytes", lambda: b"/* changed */\nint fxq_version(void){return 0;}\n")
    assert native_build._built_library() != first


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="CI installs compilers (scripts/setup.sh); here optional")
def test_ci_builds_the_native_kernel_and_its_eager_op():
    """In CI the fused kernel and the eager op are what the suite must exercise, not silently skip."""
    assert native_build.native_library() is not None
    assert native_build.native_eager_op() is not None


@needs_native
def test_a_failing_op_build_is_reported_with_the_first_error_line(monkeypatch, tmp_path):
    fake = tmp_path / "fakecxx"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fakecxx 1.0; exit 0; fi\n"
                    "echo 'In file included from torch/library.h:1,' >&2\n"
                    "echo 'fake_quant_op.cpp:9: error: no C++20' >&2; exit 1\n")  # fmt: skip
    fake.chmod(0o755)
    monkeypatch.setenv("FXQUANT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(fake))
    with pytest.raises(
        native_build.NativeKernelUnavailable, match=r"could not compile native/fake_quant_op.cpp: .*error: no C\+\+20$"
    ):
        native_build._built_op_library()
    assert list((tmp_path / "cache").iterdir()) == []


@needs_native
def test_the_op_library_is_linked_with_the_c_object_and_cached_by_its_sources(monkeypatch, tmp_path):
    """The build links the C passes into the op's library and reuses it until a source changes. (A stand-in C++ file
    that calls the C passes without torch's headers keeps this quick; the real one is what every other test loads.)
    """
    stand_in = b'extern "C" int fxq_version(void);\nextern "C" int fxq_op_probe(void) { return fxq_version(); }\n'
    monkeypatch.setattr(native_build, "_op_source_bytes", lambda: stand_in)
    monkeypatch.setenv("FXQUANT_CACHE_DIR", str(tmp_path))
    first = native_build._built_op_library()
    assert first.parent == tmp_path and first.name.startswith("fake_quant_op-")
    assert ctypes.CDLL(str(first)).fxq_op_probe() == native_build.INTERFACE_VERSION  # the C object is inside
    assert native_build._built_op_library() == first  # reused, not rebuilt
    monkeypatch.setattr(native_build, "_op_source_bytes", lambda: stand_in + b"// changed\n")
    assert native_build._built_op_library() != first


@needs_native
def test_a_process_without_the_op_warns_once_and_calls_the_c_kernel_by_ctypes(tmp_path):
    """A machine whose C++ build fails still gets the C passes (through ctypes) and one warning saying so."""
    script = (
        "import warnings, torch\n"
        "from fxquant.quant.kernel import fake_quantize\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3):\n"
        "        y = fake_quantize(torch.randn(9, requires_grad=True), torch.tensor([0.1]), None, -8, 7)\n"
        "print(y.grad_fn.name())\n"
        "print([str(w.message) for w in caught])\n"
    )
    environment = {**os.environ, "FXQUANT_CACHE_DIR": str(tmp_path), "CXX": "no-such-compiler-fxq"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr
    node, messages = done.stdout.splitlines()[-2:]
    assert node == "NativeFakeQuantizeBackward"
    assert messages.count("fxquant: the native eager fake-quant op is unavailable") == 1
    assert "no C++ compiler: 'no-such-compiler-fxq'" in messages


@needs_op
def test_the_op_checks_its_arguments_with_a_clear_error():
    op = native_build.native_eager_op()
    grid = (-8, 7, -8.5, 7.5, 1e-8, 1.0, -math.inf, math.inf)
    x, scale = torch.randn(4, 6), torch.tensor([0.1])
    cases = {
        "float32 CPU tensor": (x.double(), scale, None),
        "contiguous or channels-last": (x.t(), scale, None),
        "one step, or one per row": (x, torch.rand(3) + 0.1, None),
        "one offset": (x, torch.rand(4) + 0.1, torch.zeros(4)),
        "contiguous float32 CPU tensor": (x, torch.rand(4, 2).t().reshape(-1)[::2], None),
    }
    for message, (xs, ss, zs) in cases.items():
        with pytest.raises(RuntimeError, match=message):
            op(xs, ss, zs, *grid)


@needs_op
def test_the_op_without_autograd_gives_the_forward_values():
    """Under no_grad and inference_mode (the op's CPU kernel, no autograd node) the values are the autograd ones."""
    op = native_build.native_eager_op()
    x, scale = torch.randn(5, 7) * 2, torch.tensor([0.3], requires_grad=True)
    grid = kernels.native_grid(None, -8, 7, 0.1, (-1.0, 1.0))  # a fused Hardtanh: the clamp changes values
    reference = op(x, scale, None, *grid)
    assert torch.equal(reference, general(torch.nn.functional.hardtanh(x, -1.0, 1.0), scale, None, -8, 7, None, 0.1))
    assert reference.grad_fn is not None
    with torch.no_grad():
        assert torch.equal(op(x, scale, None, *grid), reference)
    with torch.inference_mode():
        out = op(x, scale.detach(), None, *grid)
    assert torch.equal(out, reference) and out.is_inference()


@needs_op
def test_a_step_changed_in_place_before_backward_is_refused():
    """The step is read again in backward: autograd's version check catches an in-place change, as for any saved
    tensor, instead of computing gradients with the new value."""
    x = torch.randn(16, requires_grad=True)
    scale = torch.tensor([0.1], requires_grad=True)
    with eager_path("op"):
        y = fake_quantize(x, scale, None, -8, 7)
    with torch.no_grad():
        scale.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@needs_op
@pytest.mark.parametrize("with_offset", [False, True])
def test_the_op_passes_torch_library_opcheck(with_offset):
    """Schema, autograd registration and fake kernel (output strides included) agree with what the op does."""
    op = native_build.native_eager_op()
    x = (torch.randn(3, 4, 5, 2) * 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    scale = torch.tensor([0.2], requires_grad=True)
    offset = torch.tensor([2.0], requires_grad=True) if with_offset else None
    grid = kernels.native_grid(offset, 0, 15, 0.1)
    torch.library.opcheck(op, (x, scale, offset, *grid), test_utils=("test_schema", "test_autograd_registration",
                                                                     "test_faketensor"))  # fmt: skip


@needs_native
@pytest.mark.parametrize("with_offset", [False, True])
def test_the_compiled_backward_op_falls_back_to_the_tensor_kernel_with_the_same_gradients(with_offset, monkeypatch):
    """fxquant::fake_quantize_backward run after the kernel was switched off (a graph traced before) takes the
    tensor path: the same input gradient, step and offset gradients to rounding."""
    torch.manual_seed(0)
    x, grad = torch.randn(4, 5, 6) * 3, torch.randn(4, 5, 6)
    scale, offset = torch.tensor([0.2]), torch.tensor([2.0]) if with_offset else None
    op = torch.ops.fxquant.fake_quantize_backward
    native = op(grad, x, scale, offset, 0, 15, 0.1, 0.0, 6.0)
    monkeypatch.setenv("FXQUANT_NATIVE_KERNEL", "0")
    fallback = op(grad, x, scale, offset, 0, 15, 0.1, 0.0, 6.0)
    assert torch.equal(native[0], fallback[0])
    torch.testing.assert_close(native[1], fallback[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(native[2], fallback[2], rtol=1e-5, atol=1e-6)
    assert with_offset or torch.equal(native[2], torch.zeros(1))


CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


@needs_native
@pytest.mark.parametrize("path", EAGER_PATHS)
@settings(max_examples=30, deadline=None)
@given(
    dims=st.sampled_from([4, 5]),
    per_channel=st.booleans(),
    with_offset=st.booleans(),
    sizes=st.lists(st.integers(1, 5), min_size=5, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_channels_last_tensors_run_the_native_kernel_in_place_with_the_same_result(
    path, dims, per_channel, with_offset, sizes, seed
):
    """A channels-last activation or weight (dim 0 still outermost) is quantized where it lies: no copy, the
    output keeps x's strides, and values and gradients equal the torch-ops kernel's."""
    torch.manual_seed(seed)
    x = (torch.randn(sizes[:dims]) * 3).contiguous(memory_format=CHANNELS_LAST[dims])
    rows = x.shape[0] if per_channel else 1
    scale = torch.rand(rows) * 0.3 + 0.05
    offset = torch.tensor([3.0]) if with_offset and not per_channel else None
    ch_axis = 0 if per_channel else None
    upstream = torch.randn_like(x)
    with eager_path(path):
        assert uses_native(x, scale, offset, -8, 7, ch_axis, path)
        native = run(fake_quantize, x, scale, offset, -8, 7, ch_axis, upstream)
    assert native[0].stride() == x.stride() and native[1].stride() == x.stride()
    reference = run(general, x, scale, offset, -8, 7, ch_axis, upstream)
    assert_same(native, reference, magnitude_of(x, scale, upstream, -8, 7, ch_axis))


LAYOUTS = {
    "contiguous": lambda t: t.contiguous(),
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "strided": lambda t: t.transpose(1, 3).contiguous().transpose(1, 3),  # dense, but in no format the kernel runs
}


@needs_native
@pytest.mark.parametrize("x_layout", list(LAYOUTS))
@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("rows", [1, 4])
def test_the_compiled_backward_op_takes_any_layout_and_returns_the_fake_kernels_strides(x_layout, grad_layout, rows):
    """fxquant::fake_quantize_backward is tagged flexible_layout, so inductor hands it channels-last tensors as
    they are: the gradients equal those over contiguous copies, and grad_x has the strides the fake kernel
    promised (torch.library.opcheck compares fake and real outputs)."""
    torch.manual_seed(rows)
    x, grad = torch.randn(4, 6, 5, 3) * 3, torch.randn(4, 6, 5, 3)
    scale = torch.rand(rows) * 0.3 + 0.05
    op = torch.ops.fxquant.fake_quantize_backward
    args = (LAYOUTS[grad_layout](grad), LAYOUTS[x_layout](x), scale, None, -8, 7, 0.1, 0.0, 6.0)
    result = op(*args)
    reference = op(grad, x, scale, None, -8, 7, 0.1, 0.0, 6.0)
    assert torch.equal(result[0], reference[0])
    assert result[0].stride() == torch.empty_like(args[1]).stride()
    torch.testing.assert_close(result[1], reference[1], rtol=1e-5, atol=1e-5)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@needs_op
def test_a_channels_last_model_quantizes_every_tensor_with_the_native_kernel(monkeypatch):
    """A prepared CNN moved to channels_last (weights and activations) takes the C kernel at every quantizer, as
    in NCHW, and trains to the same loss and gradients up to the convolutions' own rounding."""
    torch.manual_seed(0)
    fp = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(),
        torch.nn.Conv2d(8, 4, 1), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10),
    )  # fmt: skip
    x, labels = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    qmodel = fxquant.prepare_qat(fp, "lsq_w4a4", x)
    fxquant.calibrate(qmodel, x)
    calls = []
    op = native_build.native_eager_op()
    assert op is not None
    monkeypatch.setattr(kernels, "native_eager_op", lambda: lambda *args: calls.append(args[0].shape) or op(*args))

    def step(model, inputs):
        calls.clear()
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()], len(calls)

    nchw = step(copy.deepcopy(qmodel), x)
    channels_last = step(
        copy.deepcopy(qmodel).to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    )
    quantizers = sum(1 for m in qmodel.modules() if type(m).__name__ == "LSQQuantizer")
    assert nchw[2] == channels_last[2] == quantizers
    torch.testing.assert_close(channels_last[0], nchw[0], rtol=1e-4, atol=1e-4)
    for grad, reference in zip(channels_last[1], nchw[1], strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-3, atol=1e-3)
