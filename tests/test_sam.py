"""SAM/SAQ: one step through TrainStep equals a two-pass computation written out by hand."""

import copy

import pytest
import torch
import torch.nn.functional as F

import fxquant
from fxquant.config import SAMConfig
from fxquant.quant.quantizers import FakeQuantizer


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(6, 8)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _prepared(perturb, adaptive=False):
    # weights only (the manual computation below perturbs weights): SAQ's defaults also perturb BN and steps
    sam = {"rho": 0.1, "perturb": perturb, "adaptive": adaptive, "perturb_bn": False, "perturb_steps": False}
    recipe = {"extends": "lsq_w4a4", "optim": {"sam": sam}}
    qmodel = fxquant.prepare_qat(Net(), recipe)
    x = torch.randn(16, 6)
    qmodel(x)  # initialise quantizers
    return qmodel


def _manual_step(qmodel, x, y, rho, perturb, adaptive, lr):
    """SAM written out: grads at w, ε from them, grads at the perturbed point, plain SGD on those."""
    weight_qs = [m for m in qmodel.modules() if isinstance(m, FakeQuantizer) and m.role == "weight"]
    outputs, extra = {}, {}

    def capture(module, _, out):
        out.retain_grad()
        outputs[module] = out
        return out

    def add(module, _, out):
        return out + extra[module]

    params = [p for p in qmodel.parameters()]
    latents = [qmodel.model.fc1.weight, qmodel.model.fc2.weight]
    handles = [q.register_forward_hook(capture) for q in weight_qs]
    loss = F.cross_entropy(qmodel(x), y)
    grads_w = torch.autograd.grad(loss, latents, retain_graph=True) if perturb == "latent" else None
    loss.backward()
    for h in handles:
        h.remove()
    if perturb == "quantized":
        g = [outputs[q].grad for q in weight_qs]
        t = [outputs[q].detach().abs() if adaptive else torch.ones_like(outputs[q]) for q in weight_qs]
    else:
        g = list(grads_w)
        t = [w.detach().abs() if adaptive else torch.ones_like(w) for w in latents]
    norm = torch.sqrt(sum(((gi * ti) ** 2).sum() for gi, ti in zip(g, t)))
    eps = [rho * ti * ti * gi / norm for gi, ti in zip(g, t)]
    for p in params:
        p.grad = None
    if perturb == "quantized":
        extra.update(zip(weight_qs, eps))
        handles = [q.register_forward_hook(add) for q in weight_qs]
    else:
        with torch.no_grad():
            for w, e in zip(latents, eps):
                w.add_(e)
    F.cross_entropy(qmodel(x), y).backward()
    if perturb == "quantized":
        for h in handles:
            h.remove()
    else:
        with torch.no_grad():
            for w, e in zip(latents, eps):
                w.sub_(e)
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.sub_(lr * p.grad)


@pytest.mark.parametrize("perturb", ["quantized", "latent"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_one_sam_step_equals_the_manual_two_pass_computation(perturb, adaptive):
    qmodel = _prepared(perturb, adaptive)
    manual = copy.deepcopy(qmodel)
    torch.manual_seed(1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.1)
    step = fxquant.TrainStep(qmodel, optimizer)
    assert step.sam is not None and step.sam.config == SAMConfig(
        rho=0.1, perturb=perturb, adaptive=adaptive, perturb_bn=False, perturb_steps=False
    )
    step(x, y)
    _manual_step(manual, x, y, 0.1, perturb, adaptive, lr=0.1)
    for (name, a), b in zip(qmodel.named_parameters(), manual.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    moved = sum(
        float((a - b).detach().abs().sum()) for a, b in zip(qmodel.parameters(), _prepared(perturb).parameters())
    )
    assert moved > 0


def test_a_sam_step_lands_elsewhere_than_a_plain_step():
    qmodel = _prepared("quantized")
    plain = fxquant.prepare_qat(Net(), "lsq_w4a4")
    plain.load_state_dict(qmodel.state_dict())
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    fxquant.TrainStep(qmodel, torch.optim.SGD(qmodel.parameters(), lr=0.1))(x, y)
    fxquant.TrainStep(plain, torch.optim.SGD(plain.parameters(), lr=0.1))(x, y)
    assert not torch.allclose(qmodel.model.fc1.weight, plain.model.fc1.weight)


class ConvBnNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("update", [False, True])
def test_sam_second_pass_updates_bn_statistics_only_when_asked(update):
    """With update_bn_in_second_pass = false the running statistics after a SAM step are those after the first
    pass alone; with true they moved once more."""
    recipe = {"extends": "lsq_w4a4", "optim": {"sam": {"rho": 0.1, "update_bn_in_second_pass": update}}}
    qmodel = fxquant.prepare_qat(ConvBnNet(), recipe)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    fxquant.calibrate(qmodel, x)
    one_pass = copy.deepcopy(qmodel).train()
    with torch.no_grad():
        one_pass(x)
    fxquant.TrainStep(qmodel, torch.optim.SGD(qmodel.parameters(), lr=0.0))(x, y)
    same = torch.equal(qmodel.model.bn.running_mean, one_pass.model.bn.running_mean)
    assert same is not update
    assert int(qmodel.model.bn.num_batches_tracked) == (2 if update else 1)


def test_bad_sam_config():
    with pytest.raises(ValueError, match="rho"):
        SAMConfig(rho=0)
    with pytest.raises(fxquant.RecipeError, match=r"optim\.sam\.perturb"):
        fxquant.load_recipe({"extends": "lsq_w4a4", "optim": {"sam": {"perturb": "weights"}}})
