"""What needs a CUDA GPU (``pytest -m gpu``; skipped without one): the Triton kernels against the reference at
scale, CUDA against CPU for every quantizer kind and layer by layer in whole networks, ``fit`` on real Fashion-MNIST
in fp32, bf16 and fp16, convert and ONNX export of the CUDA-trained model, and NCCL under torchrun.

TF32 is off throughout: the comparisons are of float32 arithmetic. At 4 bits a last-bit difference in a
convolution can flip a level, and the flip grows with depth, so networks are compared layer by layer, each layer
given the same input on both devices.
"""

from __future__ import annotations

import copy
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fxquant
from fxquant.quant import QuantizerConfig, make_quantizer, reference
from fxquant.quant.kernel import fake_quantize, fake_quantize_per_token
from fxquant.quant.ops import kernels

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
HERE = Path(__file__).resolve().parent
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def test_cuda_runs_the_triton_kernels():
    assert kernels().cuda == "Triton"


SCALE_CASES = {
    # name: (shape, rows, offset, input range, layout)
    "activation per tensor, LSQ+, fused ReLU6": ((64, 96, 56, 56), 1, "shared", (0.0, 6.0), "channels_last"),
    "activation per tensor, no offset": ((64, 96, 56, 56), 1, None, None, "contiguous"),
    "weights per channel": ((512, 512, 3, 3), 512, None, None, "contiguous"),
    "weights per group of 32": ((4096 * 4096 // 32, 32), 4096 * 4096 // 32, None, None, "contiguous"),
    "per-channel offsets": ((256, 64, 28, 28), 256, "per_row", None, "contiguous"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(SCALE_CASES))
def test_the_triton_kernels_equal_the_reference_at_scale(case, dtype):
    shape, rows, offset, input_range, layout = SCALE_CASES[case]
    torch.manual_seed(0)
    x = (torch.randn(shape, device=CUDA) * 3).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    scale = torch.rand(rows, device=CUDA) * 0.2 + 0.01
    qmin, qmax = (0, 15) if offset or input_range else (-8, 7)
    zero_point = {None: None, "shared": torch.tensor([3.0], device=CUDA), "per_row": torch.randint(0, 16, (rows,),
                  device=CUDA).float()}[offset]  # fmt: skip
    low, high = input_range or (-math.inf, math.inf)
    grad = torch.randn_like(x)
    mask = [True, True, zero_point is not None]
    y = torch.ops.fxquant.fake_quantize(x, scale, zero_point, qmin, qmax, 0.01, low, high)
    gx, gs, gz = torch.ops.fxquant.fake_quantize_backward(grad, x, scale, zero_point, qmin, qmax, 0.01, low, high, mask)
    y_ref = reference.forward(x, scale, zero_point, qmin, qmax, low, high)
    gx_ref, gs_ref, gz_ref = reference.backward(grad, x, scale, zero_point, qmin, qmax, 0.01, low, high, mask)
    assert torch.equal(y, y_ref) and y.stride() == x.stride()
    assert torch.equal(gx, gx_ref) and gx.stride() == x.stride()
    # float32 sums of ~10⁸ terms in two orders: relative to the sum of the terms' magnitudes
    magnitude = float((grad.float().abs() * (x.float().abs().mean() / scale.mean() + qmax)).sum()) * 0.01 / rows
    torch.testing.assert_close(gs, gs_ref, rtol=1e-3, atol=1e-5 * magnitude)
    if zero_point is not None:
        torch.testing.assert_close(gz, gz_ref, rtol=1e-3, atol=1e-5 * magnitude)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 1024, 4096, 11008])
def test_the_per_token_kernel_equals_the_reference_at_llm_sizes(hidden, dtype):
    torch.manual_seed(hidden)
    x = (torch.randn(8, 512, hidden, device=CUDA) * torch.rand(8, 512, 1, device=CUDA) * 4).to(dtype)
    for symmetric in (False, True):
        y = fake_quantize_per_token(x, -128, 127, symmetric)
        assert torch.equal(y, reference.dynamic_forward(x, -128, 127, symmetric))


ACTIVATION = (64, 32, 14, 14)
QUANTIZERS = {
    "LSQ per tensor": (QuantizerConfig(bits=4), "activation", None, ACTIVATION),
    "LSQ+ per tensor": (QuantizerConfig(bits=4, scheme="lsq_plus", symmetric=False), "activation", None, ACTIVATION),
    "LSQ per channel": (QuantizerConfig(bits=4, granularity="per_channel"), "weight", 0, (128, 64, 3, 3)),
    "LSQ per group": (QuantizerConfig(bits=4, granularity="per_group", group_size=32), "weight", None, (256, 512)),
    "observer": (QuantizerConfig(bits=8, scheme="observer", symmetric=False), "activation", None, ACTIVATION),
    "per token": (QuantizerConfig(bits=8, granularity="per_token", symmetric=False), "activation", None, (4, 128, 512)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_each_quantizer_agrees_between_cuda_and_cpu(name):
    """The same quantizer (initialised on the CPU), the same input: the same values on both devices, gradients to
    float rounding (measured at the time of writing: outputs equal, step gradients within 3e-4 relative)."""
    config, role, ch_axis, shape = QUANTIZERS[name]
    torch.manual_seed(0)
    x = torch.randn(shape) * 2
    cpu = make_quantizer(config, role, ch_axis)
    cpu(x)  # initialise
    gpu = copy.deepcopy(cpu).to(CUDA)
    upstream = torch.randn(shape)
    results = []
    for q, device in ((cpu, "cpu"), (gpu, CUDA)):
        xs = x.to(device).requires_grad_()
        y = q(xs)
        (y * upstream.to(device)).sum().backward()
        results.append((y.detach().cpu(), xs.grad.cpu(), [p.grad.cpu() for p in q.parameters() if p.grad is not None]))
    (y_cpu, gx_cpu, steps_cpu), (y_gpu, gx_gpu, steps_gpu) = results
    assert torch.equal(y_gpu, y_cpu)
    assert torch.equal(gx_gpu, gx_cpu)
    for g_gpu, g_cpu in zip(steps_gpu, steps_cpu, strict=True):
        torch.testing.assert_close(g_gpu, g_cpu, rtol=3e-4, atol=1e-6)


def _llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=128,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


NETWORKS = {
    "resnet20 lsq_w4a4": (fxquant.models.resnet20, "lsq_w4a4", lambda: torch.randn(16, 1, 28, 28)),
    "ViT lsq_w4a4": (fxquant.models.vit_tiny, "lsq_w4a4", lambda: torch.randn(16, 1, 28, 28)),
    "LLaMA-style llm_w4a8": (_llama, "llm_w4a8", lambda: torch.randint(0, 512, (4, 64))),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_whole_networks_agree_layer_by_layer(name):
    """Every quantized layer, given on the CPU exactly the input it got on CUDA, gives what it gave on CUDA (up to
    the layer's own float rounding): fake quantization adds no device difference."""
    build, recipe, batch = NETWORKS[name]
    torch.manual_seed(0)
    x = batch()
    qmodel = fxquant.prepare_qat(build(), recipe, x[:1])
    fxquant.calibrate(qmodel, x)
    qmodel.eval()
    gpu = copy.deepcopy(qmodel).to(CUDA)
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, fxquant.QuantizedLayer)}
    gpu_layers = dict(gpu.named_modules())
    seen: dict[str, tuple] = {}

    def record(name: str):
        def hook(module, args, out) -> None:  # returns None: the output is left as it is
            seen.setdefault(name, (args, out))

        return hook

    hooks = [gpu_layers[n].register_forward_hook(record(n)) for n in layers]
    with torch.no_grad():
        gpu(x.to(CUDA))
    for hook in hooks:
        hook.remove()
    assert seen, "no quantized layer ran"
    with torch.no_grad():
        for n, (args, out) in seen.items():
            expected = out.cpu()
            got = layers[n](*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
            scale = float(expected.abs().max()) + 1e-6
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * scale, msg=n)


@pytest.fixture(scope="module")
def fashion_mnist():
    try:
        return fxquant.data.fashion_mnist("train", augment="standard"), fxquant.data.fashion_mnist("test")
    except fxquant.data.DataNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def trained_in(fashion_mnist):
    """One epoch of W4A4 resnet20 on Fashion-MNIST on CUDA per precision, from the shipped FP model."""
    train, test = fashion_mnist
    fp = fxquant.models.resnet20()
    fp.load_state_dict(torch.load(Path(fxquant.__file__).parent / "assets" / "resnet20_fashion_mnist.pt"))
    runs = {}
    for precision in ("fp32", "bf16", "fp16"):
        torch.manual_seed(0)
        qmodel = fxquant.prepare_qat(fp, "lsq_w4a4", torch.randn(1, 1, 28, 28))
        config = {"epochs": 1, "batch_size": 256, "lr": 0.01, "precision": precision}
        history = fxquant.fit(qmodel, train, test, config, progress=False, device="cuda")
        runs[precision] = (qmodel, history[0])
    return runs


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_fit_trains_on_cuda_in_each_precision(trained_in, precision):
    qmodel, record = trained_in[precision]
    assert fxquant.train.model_device(qmodel).type == "cuda"
    assert math.isfinite(record.train_loss)
    assert record.test_top1 > 85.0, record  # W4A4 from the 93.4% FP model, one epoch (≈92% on a CPU)
    for q in qmodel.quantizers().values():
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in q.parameters())


def test_a_cuda_trained_model_converts_and_exports_with_onnxruntime_agreement(trained_in, tmp_path):
    pytest.importorskip("onnxruntime")
    qmodel, _ = trained_in["bf16"]
    deployed = fxquant.convert(qmodel)
    assert fxquant.train.model_device(deployed).type == "cuda"
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x.to(CUDA)).cpu(), qmodel.eval()(x.to(CUDA)).cpu(), rtol=0, atol=0)
    report = fxquant.export_onnx(qmodel, tmp_path / "w4a4.onnx", x[:1].to(CUDA))
    assert fxquant.train.model_device(qmodel).type == "cuda"  # the export worked on a CPU copy
    for parity in fxquant.deploy.compare(report.path, deployed, x):
        assert parity.top1_agreement >= 0.99, parity


def test_nccl_under_torchrun_on_one_gpu(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
        "--master_port", str(port), str(HERE / "ddp_worker.py"), str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env={**os.environ})
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert result["backend"] == "nccl" and result["device"].startswith("cuda")
    assert all(math.isfinite(loss) for loss, _, _ in result["history"])


def test_a_bf16_activation_is_quantized_on_cuda_in_float32_and_rounded_once():
    x = (torch.randn(64, 64, 32, 32, device=CUDA) * 3).to(torch.bfloat16)
    scale = torch.tensor([0.05], device=CUDA)
    expected = (torch.round(x.float() * (1.0 / scale)).clamp(0, 15) * scale).to(torch.bfloat16)
    assert torch.equal(fake_quantize(x, scale, None, 0, 15, input_range=(0.0, math.inf)), expected)


def test_no_host_sync_in_a_quantized_training_step():
    """A W4A4 step (forward, backward, optimizer, step clamp) queues its work without waiting for the GPU: run
    under torch.cuda.set_sync_debug_mode("error"), any synchronising call raises."""
    torch.manual_seed(0)
    qmodel = fxquant.prepare_qat(fxquant.models.resnet20(), "lsq_w4a4", torch.randn(1, 1, 28, 28)).to(CUDA)
    x, y = torch.randn(32, 1, 28, 28, device=CUDA), torch.randint(0, 10, (32,), device=CUDA)
    fxquant.calibrate(qmodel, x)
    step = fxquant.TrainStep(qmodel, torch.optim.SGD(qmodel.parameters(), lr=0.01, momentum=0.9))
    step(x, y)  # warm-up: kernels compiled, optimizer state created
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        metrics = step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(float(metrics["loss"]))


def test_nn_module_state_moves_with_the_model():
    q = make_quantizer(QuantizerConfig(bits=4, scheme="lsq_plus", symmetric=False), "activation")
    q(torch.rand(16) * 3)
    q.to(CUDA)
    assert all(t.device.type == "cuda" for t in (*q.parameters(), *q.buffers()))
    y = q(torch.rand(16, device=CUDA))
    assert y.device.type == "cuda"
    nn.utils.parameters_to_vector(q.parameters())  # one device: no mixed-device error
