"""Hypothesis strategies shared by the whole test suite: random models and random valid recipes.

A generated model is a small CNN described by a list of op codes (conv, BN, ReLU, ReLU6, residual add,
concat, pooling, a conv module called twice, functional conv/linear/relu, matmul, conv-transpose, depthwise conv)
ending in pooling, flatten and a linear classifier. Every description builds a model that symbolic tracing
accepts and that runs on (N, 3, 8, 8) inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

OPS = (
    "conv",
    "bn",
    "relu",
    "relu6",
    "residual",
    "cat",
    "pool",
    "shared",
    "fconv",
    "frelu",
    "matmul",
    "convt",
    "dwconv",
)
INPUT_SHAPE = (2, 3, 8, 8)


@dataclass(frozen=True)
class ModelSpec:
    ops: tuple[str, ...]
    widths: tuple[int, ...]
    functional_head: bool
    seed: int


class GeneratedNet(nn.Module):
    """A model built from a ModelSpec; its forward walks the op list (a static Python loop)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        torch.manual_seed(spec.seed)
        self.spec = spec
        self.layers = nn.ModuleList()
        self.params = nn.ParameterList()
        channels, size = INPUT_SHAPE[1], INPUT_SHAPE[2]
        self.plan: list[tuple[str, int, int]] = []  # (op, module index or -1, param index or -1)
        for op, width in zip(spec.ops, spec.widths):
            index, pindex = -1, -1
            if op == "conv":
                self.layers.append(nn.Conv2d(channels, width, 3, padding=1))
                channels = width
            elif op == "bn":
                self.layers.append(nn.BatchNorm2d(channels))
            elif op == "relu":
                self.layers.append(nn.ReLU())
            elif op == "relu6":
                self.layers.append(nn.ReLU6())
            elif op in ("residual", "shared"):
                self.layers.append(nn.Conv2d(channels, channels, 3, padding=1, groups=1))
            elif op == "cat":
                self.layers.append(nn.Conv2d(channels, width, 1))
                channels += width
            elif op == "pool":
                if size < 2:
                    op = "relu"
                    self.layers.append(nn.ReLU())
                else:
                    self.layers.append(nn.MaxPool2d(2))
                    size //= 2
            elif op == "dwconv":
                self.layers.append(nn.Conv2d(channels, channels, 3, padding=1, groups=channels))
            elif op == "convt":
                self.layers.append(nn.ConvTranspose2d(channels, width, 3, padding=1))
                channels = width
            elif op == "fconv":
                self.params.append(nn.Parameter(torch.randn(width, channels, 3, 3) * 0.2))
                pindex = len(self.params) - 1
                channels = width
            index = len(self.layers) - 1 if op not in ("fconv", "frelu", "matmul") else -1
            self.plan.append((op, index, pindex))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.functional_head = spec.functional_head
        if spec.functional_head:
            self.head_weight = nn.Parameter(torch.randn(10, channels) * 0.2)
            self.head_bias = nn.Parameter(torch.zeros(10))
        else:
            self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op, index, pindex in self.plan:
            if op in ("conv", "bn", "relu", "relu6", "pool", "convt", "dwconv"):
                x = self.layers[index](x)
            elif op == "residual":
                x = x + self.layers[index](x)
            elif op == "shared":
                x = self.layers[index](self.layers[index](x))  # one module called twice
            elif op == "cat":
                x = torch.cat([x, self.layers[index](x)], dim=1)
            elif op == "fconv":
                x = F.conv2d(x, self.params[pindex], None, 1, 1)
            elif op == "frelu":
                x = F.relu(x)
            elif op == "matmul":
                x = torch.matmul(x, x.transpose(-1, -2)) * 0.1
        x = torch.flatten(self.pool(x), 1)
        if self.functional_head:
            return F.linear(x, self.head_weight, self.head_bias)
        return self.head(x)


@st.composite
def model_specs(draw: st.DrawFn, max_ops: int = 6) -> ModelSpec:
    ops = tuple(draw(st.lists(st.sampled_from(OPS), min_size=1, max_size=max_ops)))
    widths = tuple(draw(st.lists(st.integers(2, 6), min_size=len(ops), max_size=len(ops))))
    return ModelSpec(ops, widths, draw(st.booleans()), draw(st.integers(0, 2**16)))


def models(max_ops: int = 6) -> st.SearchStrategy[GeneratedNet]:
    return model_specs(max_ops).map(GeneratedNet)


BITS = st.sampled_from([2, 3, 4, 5, 8, 32])
EVERY_WIDTH = st.integers(2, 8)


@st.composite
def quantizer_tables(
    draw: st.DrawFn, schemes: tuple[str, ...] = ("lsq", "lsq_plus"), bits: st.SearchStrategy[int] = BITS
) -> dict:
    return {
        "bits": draw(bits),
        "scheme": draw(st.sampled_from(schemes)),
        "granularity": draw(st.sampled_from(["per_tensor", "per_channel"])),
        "symmetric": draw(st.booleans()),
    }


@st.composite
def recipes(
    draw: st.DrawFn,
    bn: tuple[str, ...] = ("keep", "fold"),
    with_rules: bool = True,
    bits: st.SearchStrategy[int] = BITS,
) -> dict:
    """A random valid recipe as a dict (rules only match types every generated model has)."""
    weight = draw(quantizer_tables(bits=bits))
    activation = draw(quantizer_tables(bits=bits))
    activation["granularity"] = "per_tensor"
    quant: dict = {"weight": weight, "activation": activation, "bn": draw(st.sampled_from(bn))}
    if draw(st.booleans()):
        quant["first_layer"] = {"weight_bits": 8, "activation_bits": 8}
    if draw(st.booleans()):
        quant["last_layer"] = {"weight_bits": draw(bits), "activation_bits": 8}
    if with_rules and draw(st.booleans()):
        # Every generated model ends in a linear layer (module or functional), so this rule always matches.
        quant["rule"] = [{"match": {"type": ["Linear", "linear"]}, "weight": {"bits": draw(bits)}}]
    return {"name": "generated", "quant": quant}


# Selectors every generated model matches (each ends in a linear layer, module or functional).
TAP_SELECTORS = ("penultimate", "output", "type:linear", "type:Linear")


@st.composite
def feature_recipes(draw: st.DrawFn) -> dict:
    """A random valid recipe with taps on selectors every generated model has, and maybe FPQ's perturbation."""
    recipe = draw(recipes())
    chosen = draw(st.lists(st.sampled_from(TAP_SELECTORS), min_size=1, max_size=3, unique=True))
    recipe["taps"] = {f"tap{i}": selector for i, selector in enumerate(chosen)}
    if draw(st.booleans()):
        recipe["loss"] = [{"kind": "fpq", "p": draw(st.sampled_from([0.0, 0.5, 1.0])), "layers": "linear"}]
    return recipe


def rounding_ties(
    qmin: int, qmax: int, zero_point: torch.Tensor | None, elements: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, x) with every x/s an exact tie (k + ½) at and around the clipping edges of [qmin, qmax] shifted by the
    offset: a power-of-two step makes (k + ½)·s exact, so round-half-to-even decides every element. ``elements``
    (default: three copies of the grid) sets the length."""
    scale = torch.tensor([2.0 ** int(torch.randint(-6, 3, ()))])
    z = 0 if zero_point is None else int(zero_point)
    grid = torch.arange(qmin - z - 3, qmax - z + 3).float() + 0.5
    count = 3 * grid.numel() if elements is None else elements
    return scale, grid.repeat(count // grid.numel() + 1)[:count] * scale


@dataclass
class QuantCase:
    """One call of the fake-quant ops: inputs and the upstream gradient (see :func:`quant_cases`)."""

    x: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    qmin: int
    qmax: int
    input_range: tuple[float, float]
    grad: torch.Tensor
    grad_factor: float = 0.37

    @property
    def numbers(self) -> tuple:
        """The ops' numbers after the tensors: (qmin, qmax, grad_factor, input_low, input_high)."""
        return (self.qmin, self.qmax, self.grad_factor, *self.input_range)

    def step_gradient_tolerance(self) -> float:
        """An absolute tolerance for the step and offset gradients: float32 rounding relative to the summed terms
        (|grad|·(|x|/s + range)), not to their possibly much smaller total."""
        s = self.scale.float().clamp(min=1e-8)
        s = s.reshape([-1] + [1] * (self.x.dim() - 1)) if s.numel() > 1 else s
        terms = self.grad.float().abs() * (self.x.float().abs() / s + max(-self.qmin, self.qmax))
        return 1e-5 * float(terms.nan_to_num(0.0, 0.0, 0.0).sum()) * self.grad_factor + 1e-6


NO_RANGE = (-float("inf"), float("inf"))
LAYOUTS = ("contiguous", "channels_last", "transposed")


@st.composite
def quant_cases(draw: st.DrawFn, dtypes=(torch.float32, torch.bfloat16, torch.float16), max_rows: int = 6) -> QuantCase:
    """A fake-quant call covering what the kernels branch on: widths 2–8, signed or not, one step or one per row
    (an output channel, a group, a token), no offset, a shared one or one per row, input dtype, layout (contiguous,
    channels-last, or rows that are not storage blocks), exact rounding ties at the clipping edges, NaN and
    infinities in x and in the gradient, a fused input clamp, and a step below MIN_STEP."""
    bits, signed = draw(st.integers(2, 8)), draw(st.booleans())
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    shape = (draw(st.integers(1, max_rows)), draw(st.integers(1, 5)), draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    rows = draw(st.sampled_from([1, shape[0]]))
    offset = draw(st.sampled_from(["none", "shared", "per_row"] if rows > 1 else ["none", "shared"]))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):  # ties: every x/s is k + ½ around the (shifted) clipping edges
        z = 0 if offset == "none" else int(torch.randint(qmin, qmax + 1, (), generator=generator))
        scale = torch.full((rows,), 2.0 ** int(torch.randint(-6, 3, (), generator=generator)))
        grid = (torch.arange(qmin - z - 3, qmax - z + 3).float() + 0.5) * scale[0]
        count = torch.Size(shape).numel()
        x = grid.repeat(count // grid.numel() + 1)[:count].reshape(shape)
        zero_point = None if offset == "none" else torch.full((rows if offset == "per_row" else 1,), float(z))
    else:
        spread = float(torch.rand((), generator=generator)) * 5 + 0.1
        x = torch.randn(shape, generator=generator) * spread
        scale = torch.rand(rows, generator=generator) * spread / 4 + 1e-3
        zero_point = {
            "none": None,
            "shared": torch.randint(qmin, qmax + 1, (1,), generator=generator).float() + 0.3,
            "per_row": torch.randint(qmin, qmax + 1, (rows,), generator=generator).float(),
        }[offset]
    if draw(st.booleans()):
        scale[0] = 1e-12  # below MIN_STEP: every kernel applies the clamped step
    grad = torch.randn(shape, generator=generator)
    if draw(st.booleans()):  # NaN, +inf and -inf inputs, and a NaN gradient
        where = torch.randperm(x.numel(), generator=generator)[:4]
        specials = torch.tensor([float("nan"), float("inf"), -float("inf")])
        x.view(-1)[where[:3]] = specials[: len(where[:3])]
        grad.view(-1)[where[-1:]] = float("nan")
    dtype = draw(st.sampled_from(dtypes))
    x, grad = x.to(dtype), grad.to(dtype)
    layout = draw(st.sampled_from(LAYOUTS))
    if layout == "channels_last":
        x, grad = x.contiguous(memory_format=torch.channels_last), grad.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":  # dense, but dim 0 is not outermost: kernels must copy
        x, grad = x.transpose(0, 3).contiguous().transpose(0, 3), grad.transpose(0, 3).contiguous().transpose(0, 3)
    input_range = draw(st.sampled_from([NO_RANGE, (0.0, float("inf")), (0.0, 6.0), (-1.0, 1.0)]))
    return QuantCase(x, scale, zero_point, qmin, qmax, input_range, grad)
