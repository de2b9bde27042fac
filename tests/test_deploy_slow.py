"""Slow: a trained resnet20 exported at W4A4 and W2A2 keeps its accuracy on the 10,000 Fashion-MNIST test images in
onnxruntime, and torchvision's classifiers export and run close to PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

import fxquant
from fxquant.data import fashion_mnist
from fxquant.deploy import compare, convert, export_onnx
from fxquant.deploy.parity import run, session
from fxquant.workflow import cached_float_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def float_resnet20(tmp_path_factory):
    train = fashion_mnist("train", augment="standard", limit=10000)
    model, _ = cached_float_model(
        fxquant.models.resnet20, "resnet20_fp_10000x2_seed0", train, 2, 0, tmp_path_factory.mktemp("cache")
    )
    return model, train


@pytest.mark.parametrize("recipe", ["lsq_w4a4", "lsq_w2a2"])
def test_a_trained_model_keeps_its_accuracy_in_onnxruntime(float_resnet20, recipe, tmp_path):
    model, train = float_resnet20
    torch.manual_seed(0)
    qmodel = fxquant.prepare_qat(model, recipe)
    fxquant.fit(qmodel, train, None, qmodel.recipe.train.override(epochs=1), progress=False)
    test = fashion_mnist("test")
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.stack([test[i][1] for i in range(len(test))]).numpy()
    deployed = convert(qmodel)
    with torch.no_grad():
        reference = torch.cat([deployed(chunk) for chunk in x.split(1000)]).numpy()
    report = export_onnx(qmodel, tmp_path / f"{recipe}.onnx", x[:1])
    torch_top1 = (reference.argmax(1) == y).mean()
    for level in ("disable_all", "enable_all"):
        sess = session(report.path, level)
        out = np.concatenate([run(sess, (chunk,)) for chunk in x.split(1000)])
        agreement = (out.argmax(1) == reference.argmax(1)).mean()
        assert agreement >= 0.999, (level, agreement)
        assert abs((out.argmax(1) == y).mean() - torch_top1) <= 0.001, level


# One model per CNN family, the families' giants left to the benchmark (vgg, wide_resnet, alexnet: 60–130 M
# parameters each, minutes per export on 2 cores, and CI has 90 minutes for everything). ConvNeXt's stochastic
# depth (self.training inside its forward) runs as written since modes are captured, so it exports too.
FAMILIES = [
    "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet", "inception_v3",
    "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnet18",
    "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1",
]  # fmt: skip


def _input_size(name: str) -> int:
    return 299 if name.startswith("inception") else 64


EIGHT_BIT = {"resnet18", "mobilenet_v2", "shufflenet_v2_x0_5"}
STATIC_BATCH = {"convnext_tiny"}


@pytest.mark.parametrize(("name", "bits"), [(n, 4) for n in FAMILIES] + [(n, 8) for n in FAMILIES if n in EIGHT_BIT])
def test_torchvision_classifiers_export_and_agree(name, bits, tmp_path):
    """One model of each torchvision CNN family at W4A4, three of them at W8A8 too (about 12 min on 2 cores);
    ``benchmarks/export.py --zoo`` runs every classification model at both widths."""
    kwargs = {"weights": None}
    if name.startswith(("inception", "googlenet")):
        kwargs["init_weights"] = False
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, **kwargs).eval()
    recipe = {"extends": "lsq_w8a8", "quant": {"weight": {"bits": bits}, "activation": {"bits": bits}}}
    qmodel = fxquant.prepare_qat(model, recipe)
    size = _input_size(name)
    x = torch.randn(4, 3, size, size)
    fxquant.calibrate(qmodel, x)
    qmodel.eval()
    # ConvNeXt: torch.export adds a storage-size guard on the batch (its permuted LayerNorm) that a dynamic
    # batch violates, so its file has a fixed batch of one (a known limit, reported in issue 14's note)
    dynamic = name not in STATIC_BATCH
    report = export_onnx(qmodel, tmp_path / f"{name}.onnx", x[:1], dynamic_batch=dynamic)
    (parity,) = compare(report.path, convert(qmodel), x if dynamic else x[:1], levels=("disable_all",))
    assert parity.output_steps <= 64, parity


def test_the_converted_model_compiles_without_graph_breaks():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    qmodel = fxquant.prepare_qat(fxquant.models.resnet20(), "lsq_w4a4")
    fxquant.calibrate(qmodel, x)
    deployed = convert(qmodel.eval())
    compiled = torch.compile(deployed, fullgraph=True)  # fullgraph: a graph break is an error
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), deployed(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["ssdlite320_mobilenet_v3_large", "lraspp_mobilenet_v3_large"])
def test_detection_and_segmentation_export_or_say_why(name, tmp_path):
    from torchvision.models import detection, segmentation

    build = {"ssdlite320_mobilenet_v3_large": detection.ssdlite320_mobilenet_v3_large,
             "lraspp_mobilenet_v3_large": segmentation.lraspp_mobilenet_v3_large}[name]  # fmt: skip
    torch.manual_seed(0)
    model = build(weights=None, weights_backbone=None).eval()
    qmodel = fxquant.prepare_qat(model, "lsq_w8a8")
    example = [torch.rand(3, 160, 160)] if name.startswith("ssd") else torch.rand(2, 3, 96, 96)
    qmodel.eval()
    with torch.no_grad():
        qmodel(example)  # detection models take targets in training mode: initialise the steps in eval
    try:
        report = export_onnx(qmodel, tmp_path / "m.onnx", (example,) if isinstance(example, list) else example)
    except fxquant.FxQuantError as err:
        assert str(err) and "\n" not in str(err).strip().splitlines()[0]  # one clear line, never a raw traceback
        return
    assert report.path.is_file()
