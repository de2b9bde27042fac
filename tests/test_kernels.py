"""fxquant's fake-quant ops (fxquant/quant/ops.py) and their kernels against the torch-ops reference
(fxquant/quant/reference.py, itself checked against torch's fused learnable kernels and the plain formula in
test_fake_quant.py): identical values and input gradients, step and offset gradients equal to rounding, over
generated calls (widths 2–8, granularities, offsets, dtypes, layouts, rounding ties, NaN and infinities, fused
input clamps). The C kernel runs here as the CPU kernel of the op; the Triton kernels run under Triton's CPU
interpreter (conftest.py sets TRITON_INTERPRET=1 where there is no GPU) or, with a GPU, on it.

Also: what the autograd node saves, the ops' argument checks, torch.library.opcheck, the native build and its
fallback (a process without a C++ compiler runs the reference under a Python autograd node, with the same numbers).
"""

from __future__ import annotations

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
from fxquant.quant import native_build, reference
from fxquant.quant.kernel import fake_quantize
from fxquant.quant.ops import _triton_kernels, kernels

from .strategies import QuantCase, models, quant_cases, recipes

needs_c = pytest.mark.skipif(kernels().cpu != "C", reason="no C/C++ compiler here: the CPU kernel is the reference")
TRITON = _triton_kernels()
needs_triton = pytest.mark.skipif(
    TRITON is None or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton is not installed, or neither a GPU nor Triton's interpreter is there to run it",
)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALL_GRADS = [True, True, True]


def op_kernel(case: QuantCase, mask=ALL_GRADS):
    forward = torch.ops.fxquant.fake_quantize(case.x, case.scale, case.zero_point, *case.numbers)
    backward = torch.ops.fxquant.fake_quantize_backward(
        case.grad, case.x, case.scale, case.zero_point, *case.numbers, mask
    )
    return forward, backward


def triton_kernel(case: QuantCase, mask=ALL_GRADS):
    to = {"device": TRITON_DEVICE}
    x, grad, scale = case.x.to(**to), case.grad.to(**to), case.scale.to(**to)
    zero_point = None if case.zero_point is None else case.zero_point.to(**to)
    forward = TRITON.fake_quantize_forward(x, scale, zero_point, *case.numbers)
    backward = TRITON.fake_quantize_backward(grad, x, scale, zero_point, *case.numbers, mask)
    return forward.cpu(), tuple(t.cpu() for t in backward)


def reference_kernel(case: QuantCase, mask=ALL_GRADS):
    low, high = case.input_range
    forward = reference.forward(case.x, case.scale, case.zero_point, case.qmin, case.qmax, low, high)
    backward = reference.backward(case.grad, case.x, case.scale, case.zero_point, *case.numbers, mask)
    return forward, backward


@contextlib.contextmanager
def torch_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def assert_matches_reference(kernel, case: QuantCase, mask=ALL_GRADS) -> None:
    (y, (gx, gs, gz)), (y_ref, (gx_ref, gs_ref, gz_ref)) = kernel(case, mask), reference_kernel(case, mask)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0, equal_nan=True)  # dtype included
    assert y.stride() == torch.empty_like(case.x).stride()
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0, equal_nan=True)
    if mask[0]:
        assert gx.stride() == torch.empty_like(case.x).stride()
    tolerance = case.step_gradient_tolerance()
    torch.testing.assert_close(gs, gs_ref, rtol=1e-4, atol=tolerance, equal_nan=True)
    torch.testing.assert_close(gz, gz_ref, rtol=1e-4, atol=tolerance, equal_nan=True)


@needs_c
@settings(max_examples=80, deadline=None)
@given(case=quant_cases(), threads=st.sampled_from([1, 2]))
def test_the_c_kernel_equals_the_reference(case, threads):
    with torch_threads(threads):
        assert_matches_reference(op_kernel, case)


@needs_c
@settings(max_examples=40, deadline=None)
@given(case=quant_cases(dtypes=(torch.float32,), max_rows=2), elements=st.sampled_from([7, 8, 2049, 70_001]))
def test_the_c_kernel_splits_long_rows_across_threads_with_the_same_result(case, elements):
    """Lane tails, block edges and one row split across threads (long rows only are split)."""
    x = torch.randn(elements) * 3
    long = QuantCase(x, case.scale[:1], None if case.zero_point is None else case.zero_point[:1], case.qmin,
                     case.qmax, case.input_range, torch.randn(elements))  # fmt: skip
    with torch_threads(2):
        assert_matches_reference(op_kernel, long)


@needs_triton
@settings(max_examples=40, deadline=None)
@given(case=quant_cases())
def test_the_triton_kernel_equals_the_reference(case):
    assert_matches_reference(triton_kernel, case)


@needs_triton
@settings(max_examples=10, deadline=None)
@given(case=quant_cases(dtypes=(torch.bfloat16,)), mask=st.sampled_from([[True, False, False], [False, True, True]]))
def test_the_triton_backward_computes_only_what_is_asked(case, mask):
    assert_matches_reference(triton_kernel, case, mask)


@st.composite
def token_cases(draw: st.DrawFn):
    """(x, qmin, qmax, symmetric) for the per-token dynamic quantizer: tokens of 1–70 features, NaN tokens."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 70)))
    x = torch.randn(shape, generator=generator) * draw(st.floats(0.01, 20.0))
    if draw(st.booleans()):
        x[0, 0, 0] = float("nan")
    if draw(st.booleans()):
        x = x.abs()  # all non-negative: the asymmetric range starts at zero
    bits, symmetric = draw(st.integers(2, 8)), draw(st.booleans())
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if symmetric and draw(st.booleans()):
        qmin, qmax = 0, 2**bits - 1
    return x.to(draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))), qmin, qmax, symmetric


@needs_triton
@settings(max_examples=30, deadline=None)
@given(case=token_cases())
def test_the_triton_per_token_kernel_equals_the_reference(case):
    x, qmin, qmax, symmetric = case
    got = TRITON.fake_quantize_dynamic(x.to(TRITON_DEVICE), qmin, qmax, symmetric).cpu()
    torch.testing.assert_close(got, reference.dynamic_forward(x, qmin, qmax, symmetric), rtol=0, atol=0,
                               equal_nan=True)  # fmt: skip


@settings(max_examples=20, deadline=None)
@given(case=token_cases())
def test_the_per_token_reference_is_the_plain_formula(case):
    """Each token on the grid of its own range: max|x|/Qp, or [min, max] ∪ {0} mapped onto [Qn, Qp]."""
    x, qmin, qmax, symmetric = case
    rows = x.float().reshape(-1, x.shape[-1])
    if symmetric:
        scale = (rows.abs().amax(1, keepdim=True) / qmax).clamp(min=1e-8)
        expected = torch.round(rows * (1.0 / scale)).clamp(qmin, qmax) * scale
    else:
        lo, hi = rows.amin(1, keepdim=True).clamp(max=0), rows.amax(1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-8)
        z = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
        expected = (torch.round(rows * (1.0 / scale) + z).clamp(qmin, qmax) - z) * scale
    got = reference.dynamic_forward(x, qmin, qmax, symmetric)
    torch.testing.assert_close(got, expected.to(x.dtype).reshape(x.shape), rtol=0, atol=0, equal_nan=True)


def test_the_per_token_op_passes_the_gradient_straight_through_and_saves_nothing():
    x = torch.randn(2, 3, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fxquant.quant.kernel.fake_quantize_per_token(x, -128, 127, False)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    assert saved == [] and torch.equal(x.grad, upstream)


def test_only_the_input_the_step_and_the_offset_are_saved_for_backward():
    x = torch.randn(64, 32, requires_grad=True)
    scale, offset = torch.tensor([0.1], requires_grad=True), torch.tensor([3.0], requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fake_quantize(x, scale, offset, 0, 15)
    assert [t.data_ptr() for t in saved] == [x.data_ptr(), scale.data_ptr(), offset.data_ptr()]


def test_a_bf16_input_is_saved_in_bf16():
    """What the backward keeps is the input in its own dtype: no float32 copy of a bf16 activation."""
    x = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fake_quantize(x, torch.tensor([0.1], requires_grad=True), None, -8, 7)
    assert [t.dtype for t in saved if t.numel() > 1] == [torch.bfloat16]


def test_the_ops_check_their_arguments_with_a_clear_error():
    x, scale = torch.randn(4, 6), torch.tensor([0.1])
    cases = {
        "scale must hold one step, or one per row": (x, torch.rand(3) + 0.1, None),
        "zero_point must hold one offset, or one per step": (x, torch.rand(4) + 0.1, torch.zeros(3)),
    }
    if kernels().cpu == "C":
        cases["scale must be a float32 CPU tensor"] = (x, scale.double(), None)
    for message, (xs, ss, zs) in cases.items():
        with pytest.raises(RuntimeError, match=message):
            torch.ops.fxquant.fake_quantize(xs, ss, zs, -8, 7, 1.0, -math.inf, math.inf)


def test_without_autograd_the_values_are_the_autograd_ones():
    x, scale = torch.randn(5, 7) * 2, torch.tensor([0.3], requires_grad=True)
    with_node = fake_quantize(x, scale, None, -8, 7, None, 0.1, (-1.0, 1.0))
    assert with_node.grad_fn is not None
    with torch.no_grad():
        assert torch.equal(fake_quantize(x, scale, None, -8, 7, None, 0.1, (-1.0, 1.0)), with_node)
    with torch.inference_mode():
        out = fake_quantize(x, scale.detach(), None, -8, 7, None, 0.1, (-1.0, 1.0))
    assert torch.equal(out, with_node) and out.is_inference()


def test_a_step_changed_in_place_before_backward_is_refused():
    """The step is read again in backward: autograd's version check catches an in-place change, as for any saved
    tensor, instead of computing gradients with the new value."""
    x = torch.randn(16, requires_grad=True)
    scale = torch.tensor([0.1], requires_grad=True)
    y = fake_quantize(x, scale, None, -8, 7)
    with torch.no_grad():
        scale.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("offset", [None, "shared", "per_row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_forward_op_passes_torch_library_opcheck(offset, dtype):
    """Schema, autograd registration, fake kernel (output strides included) and AOT tracing agree with the op."""
    x = (torch.randn(3, 4, 5, 2) * 3).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    scale = (torch.rand(3) + 0.1).requires_grad_()
    zero_point = {None: None, "shared": torch.tensor([2.0]), "per_row": torch.tensor([1.0, 2.0, 3.0])}[offset]
    zero_point = None if zero_point is None else zero_point.requires_grad_()
    args = (x, scale, zero_point, 0, 15, 0.1, 0.0, 6.0)
    torch.library.opcheck(torch.ops.fxquant.fake_quantize.default, args, test_utils=OPCHECK)


def test_the_backward_and_per_token_ops_pass_torch_library_opcheck():
    x, grad = torch.randn(4, 6, 5, 3) * 3, torch.randn(4, 6, 5, 3)
    for mask in ([True, True, True], [False, True, False]):
        args = (grad, x, torch.rand(4) + 0.1, torch.tensor([2.0]), 0, 15, 0.1, 0.0, 6.0, mask)
        torch.library.opcheck(torch.ops.fxquant.fake_quantize_backward.default, args,
                              test_utils=("test_schema", "test_faketensor"))  # fmt: skip
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    heads = torch.randn(2, 16, 4, 8).transpose(1, 2).requires_grad_()  # attention's (batch, heads, tokens, dim) view
    for x in (hidden, heads):
        torch.library.opcheck(torch.ops.fxquant.fake_quantize_dynamic.default, (x, -128, 127, False),
                              test_utils=OPCHECK)  # fmt: skip


LAYOUTS = {
    "contiguous": lambda t: t.contiguous(),
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "strided": lambda t: t.transpose(1, 3).contiguous().transpose(1, 3),  # dense, but in no format the kernel runs
}


@pytest.mark.parametrize("x_layout", list(LAYOUTS))
@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("rows", [1, 4])
def test_the_backward_op_takes_any_layout_and_returns_the_fake_kernels_strides(x_layout, grad_layout, rows):
    """fxquant::fake_quantize_backward is tagged flexible_layout, so inductor hands it channels-last tensors as
    they are: the gradients equal those over contiguous copies, and grad_x has the strides the fake kernel
    promised."""
    torch.manual_seed(rows)
    x, grad = torch.randn(4, 6, 5, 3) * 3, torch.randn(4, 6, 5, 3)
    scale = torch.rand(rows) * 0.3 + 0.05
    op = torch.ops.fxquant.fake_quantize_backward
    args = (LAYOUTS[grad_layout](grad), LAYOUTS[x_layout](x), scale, None, -8, 7, 0.1, 0.0, 6.0, ALL_GRADS)
    result = op(*args)
    expected = op(grad, x, scale, None, -8, 7, 0.1, 0.0, 6.0, ALL_GRADS)
    assert torch.equal(result[0], expected[0])
    assert result[0].stride() == torch.empty_like(args[1]).stride()
    torch.testing.assert_close(result[1], expected[1], rtol=1e-5, atol=1e-5)


FALLBACK_SCRIPT = """
import sys, torch, fxquant
from fxquant.quant.ops import kernels
from tests.strategies import INPUT_SHAPE
torch.manual_seed(0)
net = torch.load(sys.argv[1], weights_only=False)
x = torch.randn(INPUT_SHAPE)
qmodel = fxquant.prepare_qat(net, {recipe!r}, x[:1])
fxquant.calibrate(qmodel, x)
xs = x.clone().requires_grad_()
out = qmodel(xs)
(out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
grads = {{name: p.grad for name, p in qmodel.named_parameters() if p.grad is not None}}
torch.save((kernels(), out.detach(), xs.grad, grads), sys.argv[2])
"""


@needs_c
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=models(max_ops=4), recipe=recipes(bits=st.sampled_from([2, 4, 8])))
def test_a_process_on_the_fallback_sees_the_same_forward_and_gradients(model, recipe, tmp_path):
    """End to end on a prepared model: the C kernel under the C++ node here, the reference under the Python node in
    a process with FXQUANT_NATIVE_KERNEL=0: the same output and input gradient bit for bit, parameter gradients to
    rounding."""
    torch.save(model, tmp_path / "net.pt")
    results = []
    for switch in ("1", "0"):
        out_file = tmp_path / f"out{switch}.pt"
        environment = {**os.environ, "FXQUANT_NATIVE_KERNEL": switch, "PYTHONPATH": os.getcwd()}
        done = subprocess.run(
            [sys.executable, "-c", FALLBACK_SCRIPT.format(recipe=recipe), str(tmp_path / "net.pt"), str(out_file)],
            capture_output=True, text=True, env=environment, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        results.append(torch.load(out_file, weights_only=False))
    (native, out, gx, grads), (fallback, out_ref, gx_ref, grads_ref) = results
    assert (native.cpu, native.autograd, fallback.cpu, fallback.autograd) == ("C", "C++", "reference", "Python")
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-3, atol=1e-4, msg=name)


def test_a_process_without_a_cxx_compiler_warns_once_and_still_quantizes(tmp_path):
    script = (
        "import warnings, torch\n"
        "from fxquant.quant.kernel import fake_quantize\n"
        "from fxquant.quant.ops import kernels\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3):\n"
        "        y = fake_quantize(torch.randn(9, requires_grad=True), torch.tensor([0.1]), None, -8, 7)\n"
        "    y.sum().backward()\n"
        "print(kernels().cpu, kernels().autograd)\n"
        "print([str(w.message) for w in caught])\n"
    )
    environment = {**os.environ, "FXQUANT_CACHE_DIR": str(tmp_path), "CXX": "no-such-compiler-fxq"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr
    backends, messages = done.stdout.splitlines()[-2:]
    assert backends == "reference Python"
    assert messages.count("fxquant: the native CPU kernels are unavailable") == 1
    assert "no C++ compiler: 'no-such-compiler-fxq'" in messages


@pytest.mark.parametrize("variable, language", [("CC", "C"), ("CXX", "C\\+\\+")])
def test_a_missing_compiler_is_reported_in_one_line(variable, language, monkeypatch, tmp_path):
    monkeypatch.setenv("FXQUANT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(variable, "no-such-compiler-fxq")
    with pytest.raises(native_build.NativeKernelUnavailable, match=f"no {language} compiler: 'no-such-compiler-fxq'"):
        native_build.built_op_library()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("variable", ["CC", "CXX"])
def test_a_failing_build_is_reported_with_the_first_error_line(variable, monkeypatch, tmp_path):
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fakecc 1.0; exit 0; fi\n"
                    "echo 'In file included from torch/library.h:1,' >&2\n"
                    "echo 'fake_quant.c:9: error: broken' >&2; exit 1\n")  # fmt: skip
    fake.chmod(0o755)
    monkeypatch.setenv("FXQUANT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(variable, str(fake))
    failure = r"could not compile native/fake_quant.*error: broken$"
    with pytest.raises(native_build.NativeKernelUnavailable, match=failure):
        native_build.built_op_library()
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written library left behind


@needs_c
def test_the_library_links_the_c_passes_and_is_cached_by_its_sources(monkeypatch, tmp_path):
    """The build links the C passes into the op library and reuses it until a source changes. (A stand-in C++ file
    that calls the C passes without torch's headers keeps this quick; the real one is what every other test loads.)
    """
    stand_in = b'extern "C" int fxq_backward();\nextern "C" void *fxq_op_probe() { return (void *)&fxq_backward; }\n'
    monkeypatch.setattr(native_build, "_op_source_bytes", lambda: stand_in)
    monkeypatch.setenv("FXQUANT_CACHE_DIR", str(tmp_path))
    first = native_build.built_op_library()
    assert first.parent == tmp_path and first.name.startswith("fake_quant_op-")
    assert ctypes.CDLL(str(first)).fxq_op_probe() is not None  # the C object is inside
    assert native_build.built_op_library() == first  # reused, not rebuilt
    monkeypatch.setattr(native_build, "_op_source_bytes", lambda: stand_in + b"// changed\n")
    assert native_build.built_op_library() != first


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="CI installs compilers (scripts/setup.sh); here optional")
def test_ci_builds_the_native_kernels():
    """In CI the C kernel and the C++ node are what the suite must exercise, not silently skip."""
    assert (kernels().cpu, kernels().autograd) == ("C", "C++")


def test_a_channels_last_model_trains_like_the_same_model_in_nchw():
    """A prepared CNN moved to channels_last (weights and activations) is quantized where its tensors lie (the
    kernels take the layout), and gets the same loss and gradients up to the convolutions' own rounding."""
    torch.manual_seed(0)
    fp = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(),
        torch.nn.Conv2d(8, 4, 1), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10),
    )  # fmt: skip
    x, labels = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    qmodel = fxquant.prepare_qat(fp, "lsq_w4a4", x)
    fxquant.calibrate(qmodel, x)

    def step(model, inputs):
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    nchw = step(copy.deepcopy(qmodel), x)
    channels_last = step(
        copy.deepcopy(qmodel).to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    )
    torch.testing.assert_close(channels_last[0], nchw[0], rtol=1e-4, atol=1e-4)
    for grad, expected in zip(channels_last[1], nchw[1], strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-3, atol=1e-3)


def test_generated_inputs_are_what_the_kernels_branch_on():
    """The strategy above is not vacuous: it draws every dtype, layout, offset kind, ties and specials."""
    seen = set()

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(quant_cases())
    def collect(case):
        offset = "none" if case.zero_point is None else ("per_row" if case.zero_point.numel() > 1 else "shared")
        seen.update({case.x.dtype, offset, case.input_range != (-math.inf, math.inf), bool(case.x.isnan().any())})

    collect()
    assert {torch.float32, torch.bfloat16, torch.float16, "none", "shared", "per_row", True, False} <= seen


@needs_triton
def test_a_triton_kernel_that_cannot_be_built_falls_back_to_the_reference_once(monkeypatch):
    """On a GPU or Triton the kernels cannot be built for, each op warns once and runs the reference (the same
    numbers) instead of failing the training step."""
    from fxquant.quant import ops

    def unbuildable(*args):
        raise TRITON.KERNEL_ERRORS[0]("no div_rn on this GPU", None, None)

    unbuildable.__name__ = "fake_quantize_forward_test"
    kernel = ops._or_reference(unbuildable, ops._reference_forward)
    x, scale = torch.randn(3, 5), torch.tensor([0.1])
    args = (x, scale, None, -8, 7, 1.0, -math.inf, math.inf)
    with pytest.warns(RuntimeWarning, match="could not build the GPU kernel fake_quantize_forward_test"):
        first = kernel(*args)
    second = kernel(*args)  # no second warning: the reference runs from now on
    assert torch.equal(first, reference.forward(x, scale, None, -8, 7)) and torch.equal(second, first)
    monkeypatch.setattr(ops, "_UNBUILDABLE", set())
