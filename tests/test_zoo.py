"""Every torchvision classification model, and detection/segmentation models that plain symbolic_trace and
torch.ao's prepare_qat_fx cannot trace: prepared, quantized inside, trained forward and backward."""

import pytest
import torch
import torchvision
from torchvision.models import detection, segmentation

import fxquant

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
    assert qmodel.graph_module is not None and not qmodel.report.opaque
    size = _input_size(name)
    out = qmodel(torch.randn(2, 3, size, size))
    reference = model.train()(torch.randn(2, 3, size, size))
    assert type(out) is type(reference)
    outputs = [o for o in out if isinstance(o, torch.Tensor)] if isinstance(out, tuple) else [out]
    sum(o.sum() for o in outputs).backward()  # every head, including GoogLeNet/Inception aux logits
    steps = [q.scale for q in qmodel.quantizers().values()]
    assert steps and all(s.grad is not None for s in steps)


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
    out = qmodel(x)
    assert sorted(out) == sorted(model.train()(x))
    out["out"].sum().backward()


@pytest.mark.parametrize("name", _params(DETECTION, {"ssdlite320_mobilenet_v3_large"}))
def test_detection_model(name):
    model = DETECTION[name](weights=None, weights_backbone=None)
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4")
    heads = {"fasterrcnn_resnet50_fpn": ["backbone.body", "backbone.fpn", "rpn.head", "roi_heads"]}
    _quantized_inside(qmodel, heads.get(name, ["backbone", "head.classification_head", "head.regression_head"]))
    images = [torch.rand(3, 160, 160), torch.rand(3, 160, 160)]
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
