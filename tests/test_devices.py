"""Devices and precision without a GPU: where fxquant creates tensors, moving batches to the model, autocast in
bf16 and fp16 for every recipe family, and the clear errors of issue 28.

Two audits catch a tensor created on the wrong device without a GPU to show it:

* statically, every ``torch.tensor/zeros/ones/arange/empty/full/rand*/...`` call in ``fxquant/`` and ``passes/``
  either says ``device=`` or carries a ``# device:`` comment saying why it may live on the CPU;
* dynamically, the training, loss, search and calibration paths run with ``torch.set_default_device("meta")``:
  a tensor made without a device lands on ``meta`` and meeting the CPU data raises at once.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import fxquant
from fxquant.errors import FxQuantError, RecipeError
from fxquant.models import resnet20
from fxquant.train.devices import DeviceError, Precision, model_device, resolve_device, to_device

from .test_train_and_cli import fake_fashion

ROOT = Path(__file__).resolve().parents[1]
FACTORIES = {
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "linspace", "eye",
    "rand", "randn", "randint", "randperm", "normal",
}  # fmt: skip


@pytest.fixture
def tiny_fashion(tmp_path, monkeypatch):
    return fake_fashion(tmp_path, monkeypatch, 40)


def factory_calls_without_a_device(source: str) -> list[int]:
    """Lines of ``torch.<factory>(...)`` calls with no ``device=`` and no ``# device:`` comment on their lines."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        if not (isinstance(owner, ast.Name) and owner.id == "torch" and node.func.attr in FACTORIES):
            continue
        if any(keyword.arg == "device" for keyword in node.keywords):
            continue
        span = lines[node.lineno - 1 : (node.end_lineno or node.lineno)]
        if not any("# device:" in line for line in span):
            found.append(node.lineno)
    return found


def test_every_tensor_fxquant_creates_says_its_device_or_why_it_needs_none():
    problems = [
        f"{path.relative_to(ROOT)}:{line}"
        for folder in ("fxquant", "passes")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line in factory_calls_without_a_device(path.read_text(encoding="utf-8"))
    ]
    assert not problems, (
        "tensors created without device= (pass the data's device, or add a '# device: why' comment):\n"
        + "\n".join(problems)
    )


def test_the_static_audit_sees_a_tensor_without_a_device():
    planted = "import torch\n\ndef f(x):\n    count = torch.tensor([1.0])\n    return x / count\n"
    assert factory_calls_without_a_device(planted) == [4]
    assert factory_calls_without_a_device(planted.replace("[1.0])", "[1.0], device=x.device)")) == []
    assert factory_calls_without_a_device(planted.replace("[1.0])", "[1.0])  # device: CPU only")) == []


# -- the meta default device: a tensor made without a device meets CPU data and fails -------------------------------
RECIPE_FAMILIES = {
    "lsq_w4a4": {},  # LSQ weights per channel, LSQ+ activations, fused ReLUs
    "lsq_w2a2": {},
    "ptq_w8a8": {},  # observers
    "fpq_w4a4": {},  # perturbations, CSD with the FP teacher
    "cr_w4a4": {},  # EMA teacher, a second (augmented) view
    "mec_w4a4": {},  # two views, the gate
    "saq_w4a4": {},  # SAM's two passes
    "lsq_w4a4_mse": {"quant": {"activation": {"init": "mse"}, "weight": {"init": "mse"}}},
    "lsq_w4a4_kd": {"loss": [{"kind": "kd"}, {"kind": "dkd"}]},
}


def _recipe(name: str):
    overrides = RECIPE_FAMILIES[name]
    base = name.split("_mse")[0].split("_kd")[0]
    return {"extends": base, **overrides} if overrides else base


@pytest.mark.parametrize("name", sorted(RECIPE_FAMILIES))
def test_training_creates_no_tensor_without_a_device(name):
    """calibrate → TrainStep (views, teachers, losses, SAM, optimizer) → evaluate, with every tensor created
    without a device landing on meta: any such tensor meeting the CPU model or data raises."""
    torch.manual_seed(0)
    fp = resnet20()
    qmodel = fxquant.prepare_qat(fp, _recipe(name), torch.randn(1, 1, 28, 28), float_model=fp)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.01, momentum=0.9)
    with torch.device("meta"):
        fxquant.calibrate(qmodel, x)
        step = fxquant.TrainStep(qmodel, optimizer)
        for _ in range(2):
            metrics = step(x, y)
        result = fxquant.evaluate(qmodel, [(x, y)])
    assert all(value.device.type == "cpu" for value in metrics.values())
    assert math.isfinite(float(metrics["loss"])) and 0 <= result["top1"] <= 100


def test_search_and_zero_shot_create_no_tensor_without_a_device(tiny_fashion):
    from fxquant.search import search
    from fxquant.train.coreset import score_samples
    from fxquant.zeroshot import train as zeroshot_train

    torch.manual_seed(0)
    fp = resnet20()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    qmodel = fxquant.prepare_qat(fp, "lsq_w4a4", torch.randn(1, 1, 28, 28))
    fxquant.calibrate(qmodel, x)
    data = fxquant.data.fashion_mnist("train")
    lrq = fxquant.prepare_qat(fp, "lrq_w4a4", float_model=fp)
    with torch.device("meta"):
        for method in ("hessian", "sam"):
            plan, _ = search(qmodel, [(x, y)], {"budget": "avg3", "method": method, "max_iterations": 3})
            assert plan
        plan, _ = search(qmodel, [(x, y), (x, y)], {"budget": "avg4", "method": "saq", "iterations": 2})
        zeroshot_train(lrq, {"iterations": 2, "warmup_iterations": 1, "batch_size": 4})
    # (coreset scoring iterates a DataLoader, whose own seeding reads a tensor made on the default device: outside)
    scores = score_samples(qmodel, fp, data)
    assert scores.evs.device.type == "cpu" and len(scores.evs) == len(data)


# -- bf16 and fp16 autocast on CPU for every recipe family ----------------------------------------------------------
def _llama(hidden: int = 64):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(RECIPE_FAMILIES))
def test_a_train_step_runs_under_autocast_with_float32_steps(precision, name):
    torch.manual_seed(0)
    fp = resnet20()
    qmodel = fxquant.prepare_qat(fp, _recipe(name), torch.randn(1, 1, 28, 28), float_model=fp)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    fxquant.calibrate(qmodel, x)
    seen = _quantizer_dtypes(qmodel)
    step = fxquant.TrainStep(qmodel, torch.optim.SGD(qmodel.parameters(), lr=0.01), precision=precision)
    metrics = step(x, y)
    assert math.isfinite(float(metrics["loss"]))
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert low in {dtype for dtype, _ in seen}, "no quantizer saw an autocast tensor"
    assert all(inp == out for inp, out in seen), "a quantizer changed its input's dtype"
    for q in qmodel.quantizers().values():
        for p in q.parameters():
            # (an fp16 step whose scaled gradients overflowed is skipped by the scaler: the values stay finite)
            assert p.dtype == torch.float32 and torch.isfinite(p).all()
            assert p.grad is None or p.grad.dtype == torch.float32


def _quantizer_dtypes(model: nn.Module) -> list[tuple[torch.dtype, torch.dtype]]:
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    for q in fxquant.quant.quantizers_of(model).values():
        q.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    return seen


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("recipe", ["llm_w4a8", "llm_w4"])
def test_llm_recipes_run_under_autocast_and_quantize_each_input_as_the_float32_formula(precision, recipe):
    """Per-group weights, per-token activations and attention products under autocast: every quantizer returns its
    input's dtype, and its output is the float32 result rounded once to that dtype."""
    torch.manual_seed(0)
    model = _llama()
    ids = torch.randint(0, 100, (2, 16))
    qmodel = fxquant.prepare_qat(model, recipe, (ids,))
    fxquant.calibrate(qmodel, ids)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    checked = []

    def check(q, args, out):
        with torch.no_grad():
            expected = type(q).forward(q, args[0].detach().float()).to(args[0].dtype)
        assert out.dtype == args[0].dtype
        torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)
        checked.append(args[0].dtype)

    for q in fxquant.quant.quantizers_of(qmodel).values():
        q.register_forward_hook(check)
    with torch.autocast("cpu", dtype=low):
        logits = qmodel(ids).logits
    logits.float().logsumexp(-1).mean().backward()
    assert low in checked


def test_a_model_cast_to_bf16_keeps_float32_steps_and_trains():
    """model.to(torch.bfloat16): pure bf16 training; quantizer steps stay float32 master values."""
    torch.manual_seed(0)
    qmodel = fxquant.prepare_qat(resnet20(), "lsq_w4a4", torch.randn(1, 1, 28, 28))
    fxquant.calibrate(qmodel, torch.randn(8, 1, 28, 28))
    qmodel.to(torch.bfloat16)
    steps = [p for q in qmodel.quantizers().values() for p in q.parameters()]
    assert steps and all(p.dtype == torch.float32 for p in steps)
    assert all(p.dtype == torch.bfloat16 for n, p in qmodel.named_parameters() if n.endswith("conv1.weight"))
    out = qmodel(torch.randn(4, 1, 28, 28, dtype=torch.bfloat16))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and all(p.grad is not None and p.grad.dtype == torch.float32 for p in steps)


# -- the run follows the model ---------------------------------------------------------------------------------------
def test_to_device_moves_nested_batches_and_leaves_others_alone():
    batch = (torch.zeros(2), [torch.ones(1), "label"], {"mask": torch.zeros(3)})
    moved = to_device(batch, torch.device("cpu"))
    assert moved[0] is batch[0] and moved[1][1] == "label" and moved[2]["mask"] is batch[2]["mask"]
    meta = to_device(batch, torch.device("meta"))
    assert meta[0].device.type == "meta" and meta[2]["mask"].device.type == "meta"
    with pytest.raises(DeviceError, match="meta device"):
        to_device(torch.empty(2, device="meta"), torch.device("cpu"))


def test_fit_runs_in_bf16_on_the_cpu(tiny_fashion):
    qmodel = fxquant.prepare_qat(resnet20(), "lsq_w4a4")
    data = fxquant.data.fashion_mnist("train")
    config = {"epochs": 1, "batch_size": 8, "lr": 0.01, "precision": "bf16", "device": "cpu"}
    history = fxquant.fit(qmodel, data, data, config, progress=False)
    assert math.isfinite(history[0].train_loss) and 0 <= history[0].test_top1 <= 100
    assert model_device(qmodel).type == "cpu"


def test_auto_is_the_models_accelerator_else_cuda_else_cpu(monkeypatch):
    assert resolve_device("auto", nn.Linear(2, 2)) == torch.device("cpu") or torch.cuda.is_available()
    meta = nn.Linear(2, 2, device="meta")
    assert resolve_device("auto", meta) == resolve_device("auto")  # meta is no accelerator: auto decides
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto", nn.Linear(2, 2)) == torch.device("cuda", 1)  # torchrun's rank device
    assert resolve_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"has 2 CUDA GPU\(s\): cuda:0..cuda:1"):
        resolve_device("cuda:2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_asking_for_cuda_without_one_is_a_clear_error(tiny_fashion):
    with pytest.raises(DeviceError, match="this torch sees no CUDA GPU"):
        resolve_device("cuda")
    qmodel = fxquant.prepare_qat(resnet20(), "lsq_w4a4")
    with pytest.raises(DeviceError, match="device 'cuda:0' asked for"):
        fxquant.fit(qmodel, fxquant.data.fashion_mnist("train"), None, {"epochs": 1}, device="cuda:0", progress=False)


def test_bf16_on_a_gpu_without_it_is_refused_before_training(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(DeviceError, match=r"bf16 needs a GPU with bfloat16 .* Tesla T4 \(7.5\): use fp16"):
        Precision.of("bf16", torch.device("cuda", 0))
    assert Precision.of("fp16", torch.device("cuda", 0)).scaler() is not None
    assert Precision.of("bf16", torch.device("cpu")).dtype == torch.bfloat16


def test_a_model_split_across_devices_is_refused_with_both_places():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2, device="meta"))
    with pytest.raises(DeviceError, match=r"split across devices \('0.weight' on cpu, '1.weight' on meta\)"):
        model_device(model)
    qmodel = fxquant.prepare_qat(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), "lsq_w4a4")
    qmodel.model.get_submodule("2").to("meta")
    with pytest.raises(DeviceError, match="split across devices"):
        fxquant.TrainStep(qmodel, torch.optim.SGD(qmodel.parameters(), lr=0.1))


def test_an_input_on_another_device_than_the_model_is_one_clear_line():
    qmodel = fxquant.prepare_qat(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), "lsq_w4a4")
    with pytest.raises(FxQuantError, match=r"the model is on cpu but its input 0 is on meta: move the batch"):
        qmodel(torch.empty(3, 4, device="meta"))


def test_fp16_autocast_around_a_train_step_without_its_scaler_is_refused():
    qmodel = fxquant.prepare_qat(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), "lsq_w4a4")
    step = fxquant.TrainStep(qmodel, torch.optim.SGD(qmodel.parameters(), lr=0.1))
    with (
        torch.autocast("cpu", dtype=torch.float16),
        pytest.raises(DeviceError, match=r"without a gradient scaler.*precision='fp16'"),
    ):
        step(torch.randn(3, 4), torch.tensor([0, 1, 0]))


def test_device_and_precision_are_validated_recipe_keys():
    with pytest.raises(RecipeError, match=r"train\.device.*auto, cpu, cuda, cuda:N"):
        fxquant.config.load_recipe("lsq_w4a4", {"train": {"device": "gpu"}})
    with pytest.raises(RecipeError, match=r"train\.precision"):
        fxquant.config.load_recipe("lsq_w4a4", {"train": {"precision": "fp8"}})
    recipe = fxquant.config.load_recipe("lsq_w4a4", {"train": {"device": "cuda:1", "precision": "bf16"}})
    assert (recipe.train.device, recipe.train.precision) == ("cuda:1", "bf16")


def test_cli_device_is_checked_in_one_line(capsys):
    from fxquant.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--device", "gpu"])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--device" in err and "auto, cpu, cuda" in err


def test_load_puts_the_model_where_asked(tmp_path):
    qmodel = fxquant.prepare_qat(resnet20(), "lsq_w4a4", torch.randn(1, 1, 28, 28))
    fxquant.calibrate(qmodel, torch.randn(4, 1, 28, 28))
    fxquant.save(qmodel, tmp_path / "q.pt")
    loaded = fxquant.load(tmp_path / "q.pt", resnet20(), map_location="meta")
    assert model_device(loaded).type == "meta"
    again = fxquant.load(tmp_path / "q.pt", resnet20())
    assert model_device(again).type == "cpu"
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(again.eval()(x), qmodel.eval()(x), rtol=0, atol=0)


def test_prepare_puts_new_quantizers_where_the_model_is():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).to("meta")
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4")
    assert {t.device.type for t in (*qmodel.parameters(), *qmodel.buffers())} == {"meta"}
