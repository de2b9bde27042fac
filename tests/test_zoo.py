"""Every torchvision classification model, and detection/segmentation models that plain symbolic_trace and
torch.ao's prepare_qat_fx cannot trace: prepared, quantized inside, trained forward and backward."""

import pytest
import torch
import torchvision
from torchvision.models import detection, segmentation

import fxquant
from fxquant.quant.controls import disable_quant

# Why a module may stay opaque in a torchvision model: its forward reads self.training (stochastic depth,
# GoogLeNet's auxiliary heads, Swin's attention dropout), or its weights are read by such a forward directly.
ALLOWED_OPAQUE = ("reads self.training", "used directly by")


def _quantizers_off_matches_the_original(qmodel, model, inputs, close):
    """With its quantizers off, the freshly prepared model in eval mode computes what the original computes in
    eval mode (before either trains: training moves their BN statistics apart)."""
    qmodel.eval(), model.eval()
    with torch.no_grad(), disable_quant(qmodel):
        close(qmodel(*inputs), model(*inputs), exact=False)
    qmodel.train(), model.train()


def _eval_is_deterministic(qmodel, inputs, close):
    qmodel.eval()
    with torch.no_grad():
        close(qmodel(*inputs), qmodel(*inputs), exact=True)


SMALL = {"resnet18", "mobilenet_v3_small", "squeezenet1_1"}
CLASSIFICATION = torchvision.models.list_models(module=torchvision.models)


def _input_size(name: str) -> int:
    if name.startswith("inception"):
        return 299
    if name.startswith(("vit", "swin", "maxvit")):
        return 224
    return 64


def _params(names, small):
    return [pytest.param(n, marks=() if n in small else pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", _params(CLASSIFICATION, SMALL))
def test_classification_model(name):
    kwargs = {"weights": None}
    if name.startswith(("inception", "googlenet")):
        kwargs["init_weights"] = False
    model = torchvision.models.get_model(name, **kwargs)
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4")
    assert all(any(why in reason for why in ALLOWED_OPAQUE) for reason in qmodel.report.opaque.values())
    size = _input_size(name)
    probe = (torch.randn(2, 3, size, size),)
    _quantizers_off_matches_the_original(qmodel, model, probe, _close_tensors)
    out = qmodel(torch.randn(2, 3, size, size))
    reference = model.train()(torch.randn(2, 3, size, size))
    assert type(out) is type(reference)
    outputs = [o for o in out if isinstance(o, torch.Tensor)] if isinstance(out, tuple) else [out]
    sum(o.sum() for o in outputs).backward()  # every head, including GoogLeNet/Inception aux logits
    steps = [q.scale for q in qmodel.quantizers().values()]
    assert steps and all(s.grad is not None for s in steps)
    _eval_is_deterministic(qmodel, probe, _close_tensors)


def _close_tensors(a, b, exact):
    assert type(a) is type(b) and a.shape == b.shape
    if exact:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


DENSE = {
    "deeplabv3_resnet50": segmentation.deeplabv3_resnet50,
    "fcn_resnet50": segmentation.fcn_resnet50,
    "lraspp_mobilenet_v3_large": segmentation.lraspp_mobilenet_v3_large,
}
DETECTION = {
    "fasterrcnn_resnet50_fpn": detection.fasterrcnn_resnet50_fpn,
    "retinanet_resnet50_fpn": detection.retinanet_resnet50_fpn,
    "ssdlite320_mobilenet_v3_large": detection.ssdlite320_mobilenet_v3_large,
}


def _quantized_inside(qmodel, prefixes):
    names = [layer.name for layer in qmodel.report.layers]
    for prefix in prefixes:
        assert any(n.startswith(prefix) for n in names), f"nothing quantized under {prefix}"


@pytest.mark.parametrize("name", _params(DENSE, {"lraspp_mobilenet_v3_large"}))
def test_segmentation_model(name):
    model = DENSE[name](weights=None, weights_backbone=None)
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4")
    _quantized_inside(qmodel, ["backbone", "classifier"])
    x = torch.randn(2, 3, 96, 96)
    close = lambda a, b, exact: _close_detections([a], [b], exact)  # noqa: E731
    _quantizers_off_matches_the_original(qmodel, model, (x,), close)
    out = qmodel(x)
    assert sorted(out) == sorted(model.train()(x))
    out["out"].sum().backward()
    _eval_is_deterministic(qmodel, (x,), close)


@pytest.mark.parametrize("name", _params(DETECTION, {"ssdlite320_mobilenet_v3_large"}))
def test_detection_model(name):
    model = DETECTION[name](weights=None, weights_backbone=None)
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4")
    heads = {"fasterrcnn_resnet50_fpn": ["backbone.body", "backbone.fpn", "rpn.head", "roi_heads"]}
    _quantized_inside(qmodel, heads.get(name, ["backbone", "head.classification_head", "head.regression_head"]))
    images = [torch.rand(3, 160, 160), torch.rand(3, 160, 160)]
    _quantizers_off_matches_the_original(qmodel, model, (images,), _close_detections)
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1])}] * 2
    losses = qmodel(images, targets)
    assert sorted(losses) == sorted(model.train()(images, targets))
    sum(losses.values()).backward()
    grads = [q.scale.grad for q in qmodel.quantizers().values()]
    assert all(g is not None for g in grads)
    qmodel.eval()
    with torch.no_grad():
        detections = qmodel(images)
    assert isinstance(detections, list) and set(detections[0]) >= {"boxes", "labels", "scores"}
    _eval_is_deterministic(qmodel, (images,), _close_detections)


def _close_detections(a, b, exact):
    assert len(a) == len(b)
    for mine, theirs in zip(a, b):
        assert sorted(mine) == sorted(theirs)
        for key in mine:
            if exact:
                assert torch.equal(mine[key], theirs[key]), key
            else:
                torch.testing.assert_close(mine[key], theirs[key], rtol=1e-4, atol=1e-3)
