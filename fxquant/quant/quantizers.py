"""Fake quantizers: LSQ, LSQ+ and observer-based, per tensor or per channel, 2–8 bits or pass-through.

A quantizer is an ``nn.Module`` that maps a float tensor to the nearest point of its integer grid times a
step (scale), returning floats ("fake" quantization). The rewritten graph calls them; they never import passes.

* :class:`LSQQuantizer` — learned step size (Esser et al., ICLR 2020), gradient scale g = 1/sqrt(N·Qp),
  step initialised to 2·mean|x|/sqrt(Qp) on the first batch. With ``learn_offset`` it is LSQ+ (a learned zero
  point in integer units, rounded in the forward pass, as MQBench does).
  ``per_group`` weights have one learned step per group of ``group_size`` consecutive input channels of each
  output channel (int4 LLM weights, torchao's "8da4w").
* :class:`ObserverQuantizer` — step and zero point from running statistics (``torch.ao`` observers), no
  learned parameters; what post-training quantization (``ptq_w8a8``) uses.
* :class:`DynamicQuantizer` — ``per_token`` activations: each token's step (and zero point) from its own range,
  recomputed on every forward; nothing learned, nothing to initialise.

All call :mod:`fxquant.quant.kernel` (fxquant's fake-quant ops: fused C on CPU, fused Triton on CUDA, LSQ's
gradients). The bit width is a plain attribute: ``q.bits = 3`` takes effect on the next forward, no re-preparation.

Devices and precision: a quantizer's state lives where the module is (``.to(device)`` moves it) and whatever it
computes from data is computed on the data's device. Steps, offsets and observer statistics are float32 master
values: a model cast to bf16 or fp16 keeps them float32 (:meth:`FakeQuantizer._apply`), a quantizer takes a bf16 or
fp16 input and returns its dtype, and the grid arithmetic is float32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fxquant.quant import reference
from fxquant.quant.kernel import MIN_STEP, clamp_input, fake_quantize, fake_quantize_per_token
from fxquant.quant.spec import FULL_PRECISION_BITS, QuantizerConfig, check_bits

from . import observers


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """(Q_min, Q_max) of a ``bits``-wide grid: signed [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b-1].

    Example usage::

        integer_range(4, signed=True)   # (-8, 7)
    """
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


class FakeQuantizer(nn.Module):
    """Common state of every quantizer: bit width, on/off switch, channel axis, signedness.

    ``signed`` may be None (decided from the first batch: signed when it has negative values). It is kept
    in a buffer so that it travels with ``state_dict``.
    """

    # Set by fxquant.train.distributed.initialize_quantizers while it runs: reduces initialisation statistics
    # across data-parallel ranks, ``reduce(tensor, "sum" | "min" | "max") -> tensor``.
    reduce_statistics = None

    def __init__(
        self,
        config: QuantizerConfig,
        ch_axis: int | None = None,
        signed: bool | None = None,
        role: str = "activation",
    ):
        super().__init__()
        if role not in ("weight", "activation"):
            raise ValueError(f"role must be 'weight' or 'activation', got {role!r}")
        self.config = config
        self.role = role
        self._bits = config.bits
        self.ch_axis = ch_axis if config.granularity == "per_channel" else None
        # per_group: the tensor is seen as (groups, group_size) rows, one step per row
        self.group_size = config.group_size if config.granularity == "per_group" else None
        self.enabled = True
        # -1 undecided, 0 unsigned, 1 signed; a buffer so that save/load restores the decision.
        flag = -1 if signed is None else int(signed)
        self.register_buffer("signed_flag", torch.tensor(flag, dtype=torch.int8))  # device: module state (.to moves it)
        self.register_buffer("initialized", torch.tensor(False))  # device: module state
        # Python mirrors of the two buffers, which every forward reads: reading a tensor's value there would be a
        # host sync in eager mode and a graph break under torch.compile. Written only by set_signed and
        # mark_initialized (and refreshed when a state_dict is loaded), so the pair never disagrees.
        self._signed: bool | None = signed
        self._is_initialized = False
        self._grad_factor_key: tuple = ()
        self._grad_factor = 1.0
        # (low, high) of an activation function folded into this quantizer by passes.fuse_activations (a ReLU is
        # (0, inf), a ReLU6 (0, 6)): the quantizer reads that function's input and applies it first, on or off.
        self.input_clamp: tuple[float, float] | None = None

    # -- bit width ----------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return self._bits

    @bits.setter
    def bits(self, value: int) -> None:
        self.set_bits(value)

    def set_bits(self, value: int, keep_range: bool = True) -> None:
        """Change the width. With ``keep_range`` (what ``q.bits = b`` does) learned steps are rescaled to keep
        the clipping range; without it the state is taken as already belonging to ``value`` (loading)."""
        check_bits(value)
        old = self._bits
        self._bits = value
        if (
            keep_range
            and old != value
            and self._is_initialized
            and value not in FULL_PRECISION_BITS
            and old not in FULL_PRECISION_BITS
        ):
            self._on_bits_changed(old, value)

    def _on_bits_changed(self, old: int, new: int) -> None:
        """Hook for quantizers with learned state that depends on the width."""

    @property
    def is_active(self) -> bool:
        return self.enabled and self._bits not in FULL_PRECISION_BITS

    @property
    def signed(self) -> bool | None:
        """True (signed grid), False (unsigned) or None (decided by the first batch)."""
        return self._signed

    def set_signed(self, value: bool | None) -> None:
        """Fix the grid's signedness (None: let the next batch decide)."""
        self._signed = value
        self.signed_flag.fill_(-1 if value is None else int(value))

    @property
    def is_initialized(self) -> bool:
        """Whether the step (or observed range) has been set from data: by :func:`fxquant.calibrate`, the first
        eager forward, or a loaded state_dict."""
        return self._is_initialized

    def mark_initialized(self, value: bool = True) -> None:
        """Record that the quantizer's state was (or, with False, must again be) set from data."""
        self._is_initialized = value
        self.initialized.fill_(value)

    def qrange(self) -> tuple[int, int]:
        """The integer range at the current width (signedness must be decided)."""
        return integer_range(self._bits, bool(self._signed))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Steps, zero points and observer statistics are shaped by the first batch (per-channel needs the
        # channel count): a fresh quantizer takes the saved shapes before loading the values.
        for key, saved in state_dict.items():
            if not key.startswith(prefix):
                continue
            *path, name = key[len(prefix) :].split(".")
            owner = self
            for part in path:
                owner = getattr(owner, part, None)
            current = getattr(owner, name, None) if owner is not None else None
            if isinstance(current, torch.Tensor) and current.shape != saved.shape:  # where the module is, not the file
                current.data = torch.empty(saved.shape, dtype=current.dtype, device=current.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        flag = int(self.signed_flag)  # loading is not a hot path: refresh the mirrors from the loaded buffers
        self._signed = None if flag < 0 else bool(flag)
        self._is_initialized = bool(self.initialized)

    def _apply(self, fn, recurse=True):
        # Casting the model (model.half(), model.to(torch.bfloat16)) leaves steps, offsets and observer statistics
        # float32: they are master values, and their gradients must survive fp16 (a 1e-8 step is 0 in fp16).
        super()._apply(fn, recurse)
        for tensor in (*self.parameters(), *self.buffers()):
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                tensor.data = tensor.data.float()
                if tensor.grad is not None:
                    tensor.grad.data = tensor.grad.data.float()
        return self

    def _reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        return t if self.reduce_statistics is None else self.reduce_statistics(t, op)

    def _decide_sign(self, x: torch.Tensor) -> None:
        if self._signed is None:
            negative = self._reduce((x < 0).any().to(torch.int32).reshape(1), "max")
            self.set_signed(bool(negative))

    def _gradient_scale(self, x: torch.Tensor) -> float:
        """LSQ's g = 1/sqrt(N·Qp) for a tensor shaped like ``x``, computed once per shape and width."""
        key = (x.shape, self._bits)
        if key != self._grad_factor_key:
            self._grad_factor = 1.0 / math.sqrt(self._elements_per_step(x) * self.qrange()[1])
            self._grad_factor_key = key
        return self._grad_factor

    def _elements_per_step(self, x: torch.Tensor) -> float:
        """N of LSQ's gradient scale: the elements one step quantizes — for a weight all of them (per
        channel: the channel's), for an activation the features of one sample."""
        n = x.numel()
        if self.group_size is not None:
            return float(self.group_size)
        if self.ch_axis is not None:
            n /= x.shape[self.ch_axis]
        if self.role == "activation" and x.dim() > 1:
            n /= x.shape[0]
        return max(n, 1.0)

    def _per_channel_view(self, x: torch.Tensor) -> torch.Tensor:
        """x as (channels, everything else)."""
        return x.detach().transpose(0, self.ch_axis).reshape(x.shape[self.ch_axis], -1)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """x as (groups, group_size): consecutive elements of each output channel's row share a step."""
        return x.reshape(-1, self.group_size)

    def extra_repr(self) -> str:
        gran = f"per_channel(axis={self.ch_axis})" if self.ch_axis is not None else "per_tensor"
        if self.group_size is not None:
            gran = f"per_group(size={self.group_size})"
        sign = {None: "sign=auto", True: "signed", False: "unsigned"}[self.signed]
        fused = "" if self.input_clamp is None else f", input_clamp={self.input_clamp}"
        return f"bits={self._bits}, {self.config.scheme}, {gran}, {sign}, enabled={self.enabled}{fused}"

    def step_range(self) -> tuple[float, float] | None:
        """(min, max) of the current step sizes, or None before initialisation."""
        scale = getattr(self, "scale", None)
        if scale is None or not self._is_initialized:
            return None
        return float(scale.detach().min()), float(scale.detach().max())


class LSQQuantizer(FakeQuantizer):
    """Learned step size quantization; LSQ+ when ``config.learns_offset``.

    Example usage::

        q = LSQQuantizer(QuantizerConfig(bits=4, granularity="per_channel"), ch_axis=0, signed=True)
        w_hat = q(conv.weight)      # first call initialises the step from the tensor itself
    """

    def __init__(
        self,
        config: QuantizerConfig,
        ch_axis: int | None = None,
        signed: bool | None = None,
        role: str = "activation",
    ):
        if config.learns_offset:
            signed = False  # LSQ+ quantizes onto an unsigned grid shifted by its learned zero point
        super().__init__(config, ch_axis, signed, role)
        self.learn_offset = config.learns_offset
        self.init = config.init
        # Shapes are fixed at the first batch (per-channel needs the channel count).
        self.scale = nn.Parameter(torch.ones(1))  # device: module state, moved by .to()
        self.width_steps: nn.ParameterDict | None = None  # SAQ's supernet: one learned step per bit width
        if self.learn_offset:
            self.zero_point = nn.Parameter(torch.zeros(1))  # device: module state
        else:
            self.register_buffer("zero_point", torch.zeros(1))  # device: module state

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set the step (and offset) from a tensor: 2·mean|x|/sqrt(Qp) symmetric, min/max for LSQ+, or with
        ``init = "mse"`` the clipping range of least squared quantization error."""
        self._decide_sign(x)
        qmin, qmax = self.qrange()
        x = x.detach().float()  # statistics in float32 whatever the input's dtype
        if self.group_size is not None:
            flat = self._grouped(x)
        else:
            flat = x.reshape(1, -1) if self.ch_axis is None else self._per_channel_view(x)
        if self.init == "mse":
            scale, zero_point = self._mse_range(flat, qmin, qmax)
        elif self.learn_offset:
            scale, zero_point = reference.affine_grid(*self._min_max(flat), qmin, qmax)
        else:
            # mean |x| as sum / count, so that data-parallel ranks can add their parts exactly
            abs_sum = self._reduce(flat.abs().sum(dim=1, dtype=torch.float64), "sum")
            count = self._reduce(flat.new_full((1,), flat.shape[1], dtype=torch.float64), "sum")
            scale = (2 * (abs_sum / count).float() / math.sqrt(qmax)).clamp(min=MIN_STEP)
            zero_point = torch.zeros_like(scale)
        # where the module lives (the data's device when the model and its input agree, as fit checks)
        self.scale.data = scale.to(device=self.scale.device, dtype=torch.float32)
        self.zero_point.data = zero_point.to(device=self.scale.device, dtype=torch.float32)
        self.mark_initialized()

    def _min_max(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row min and max reduced across ranks, widened to hold zero (zero must be exactly representable)."""
        lo = self._reduce(flat.min(dim=1).values, "min").clamp(max=0)
        hi = self._reduce(flat.max(dim=1).values, "max").clamp(min=0)
        return lo, hi

    MSE_GRID = 64  # clipping ranges α·[lo, hi], α = 1/64 … 1, tried by init = "mse"
    MSE_SAMPLES = 1 << 18  # elements per channel that score them (the range itself comes from all elements)

    def _mse_range(self, flat: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step and zero point of the range α·[lo, hi] with the least squared error of quantizing ``flat``
        (channels × elements), α chosen per channel. The range and the errors are reduced across ranks, so
        every rank picks the same α, the one a single process would pick on the global batch."""
        if self.learn_offset:
            lo, hi = self._min_max(flat)
        else:
            hi = self._reduce(flat.abs().max(dim=1).values, "max")
            lo = -hi if qmin < 0 else torch.zeros_like(hi)
        ch_axis = None if flat.shape[0] == 1 else 0
        if flat.shape[1] > self.MSE_SAMPLES:  # a strided subset scores the ranges: 64 passes over a big batch are slow
            flat = flat[:, :: -(-flat.shape[1] // self.MSE_SAMPLES)]
        candidates, errors = [], []
        for alpha in torch.arange(1, self.MSE_GRID + 1, device=flat.device) / self.MSE_GRID:
            if self.learn_offset:
                scale, zero_point = reference.affine_grid(alpha * lo, alpha * hi, qmin, qmax)
            else:
                scale = (alpha * hi / qmax).clamp(min=MIN_STEP)
                zero_point = torch.zeros_like(scale)
            offset = zero_point if self.learn_offset else None
            error = fake_quantize(flat, scale, offset, qmin, qmax, ch_axis) - flat
            errors.append(error.pow(2).sum(dim=1, dtype=torch.float64))
            candidates.append((scale, zero_point))
        best = self._reduce(torch.stack(errors), "sum").argmin(dim=0)  # per channel
        channels = torch.arange(flat.shape[0], device=flat.device)
        scale = torch.stack([c[0] for c in candidates])[best, channels]
        zero_point = torch.stack([c[1] for c in candidates])[best, channels]
        return scale, zero_point

    def share_steps_across(self, widths: list[int]) -> None:
        """Weight sharing across widths (SAQ's supernet): from now on each width in ``widths`` has its own
        learned step, starting from the current one rescaled to the same clipping range; switching ``bits``
        then selects a step instead of rescaling one. :meth:`keep_current_width` ends it.

        Example usage::

            q.share_steps_across([2, 3, 4, 8]); q.bits = 3     # trains the 3-bit step
        """
        if not self._is_initialized:
            raise RuntimeError("initialise the quantizer (one forward) before sharing its step across widths")
        signed = bool(self._signed)
        low, high = integer_range(self._bits, signed)
        steps = {}
        for width in widths:
            check_bits(width)
            w_low, w_high = integer_range(width, signed)
            steps[str(width)] = nn.Parameter(self.scale.detach() * (high - low) / (w_high - w_low))
        self.width_steps = nn.ParameterDict(steps)

    def keep_current_width(self) -> None:
        """End step sharing: the current width's step becomes the quantizer's only step."""
        if self.width_steps is not None:
            self.scale.data = self.width_steps[str(self._bits)].detach().clone()
            self.width_steps = None

    def _step(self) -> torch.Tensor:
        if self.width_steps is not None and str(self._bits) in self.width_steps:
            return self.width_steps[str(self._bits)]
        return self.scale

    def _on_bits_changed(self, old: int, new: int) -> None:
        # Keep the clipping range: the step shrinks/grows by the ratio of the grid sizes.
        signed = bool(self._signed)
        old_min, old_max = integer_range(old, signed)
        new_min, new_max = integer_range(new, signed)
        with torch.no_grad():
            if self.width_steps is None:  # with shared steps each width already has its own
                self.scale.mul_((old_max - old_min) / (new_max - new_min))
            if self.learn_offset:
                self.zero_point.mul_((new_max - new_min) / (old_max - old_min)).clamp_(new_min, new_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_active:
            return clamp_input(x, self.input_clamp)  # a fused activation stays part of the model
        if not self._is_initialized:
            # Eager convenience for the first batch; under torch.compile this branch is a guard on a Python
            # bool, and calibrating first (fxquant.calibrate, which fit runs) keeps it out of the compiled graph.
            self.initialize(clamp_input(x.detach(), self.input_clamp))
        qmin, qmax = self.qrange()
        # The kernel applies the step clamped to ≥ ε without touching the parameter; TrainStep clamps the
        # parameters themselves after each optimizer step (clamp_steps), so what is stored stays what is used.
        grad_factor = self._gradient_scale(x)
        zero_point = self.zero_point if self.learn_offset else None
        if self.group_size is not None:
            rows = self._grouped(x)
            grouped = fake_quantize(rows, self._step(), zero_point, qmin, qmax, 0, grad_factor, self.input_clamp)
            return grouped.reshape(x.shape)
        return fake_quantize(x, self._step(), zero_point, qmin, qmax, self.ch_axis, grad_factor, self.input_clamp)

    def learned_steps(self) -> list[nn.Parameter]:
        """The step parameters this quantizer learns (one, or one per width while steps are shared)."""
        return [self.scale] if self.width_steps is None else [self.scale, *self.width_steps.values()]


class ObserverQuantizer(FakeQuantizer):
    """Fake-quant with step and zero point computed from observed statistics (no learned parameters).

    Statistics are updated while ``observing`` is True (the default in training mode), frozen otherwise.

    Example usage::

        q = ObserverQuantizer(QuantizerConfig(bits=8, scheme="observer", observer="moving_average"))
        for x in calibration_batches:
            q(x)
        q.observing = False
    """

    def __init__(
        self,
        config: QuantizerConfig,
        ch_axis: int | None = None,
        signed: bool | None = None,
        role: str = "activation",
    ):
        super().__init__(config, ch_axis, signed, role)
        self.observer = observers.make_observer(config.observer, self.ch_axis)
        self.observing = True
        self.register_buffer("scale", torch.ones(1))  # device: module state, moved by .to()
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))  # device: module state

    @torch.no_grad()
    def _update_qparams(self) -> None:
        qmin, qmax = self.qrange()
        lo, hi = observers.observed_range(self.observer)
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # zero must be exactly representable
        if self.config.symmetric:
            bound = torch.maximum(-lo, hi)
            if bool(self.signed):
                scale = bound / ((qmax - qmin) / 2)
                zero_point = torch.zeros_like(scale)
            else:
                scale = bound / (qmax - qmin)
                zero_point = torch.full_like(scale, qmin)
        else:
            scale = (hi - lo) / (qmax - qmin)
            zero_point = qmin - torch.round(lo / scale.clamp(min=MIN_STEP))
        scale = scale.clamp(min=MIN_STEP).reshape(-1).float()
        self.scale = scale
        self.zero_point = zero_point.clamp(qmin, qmax).round().reshape(-1).to(torch.int32)
        self.mark_initialized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_active:
            return x
        if self.observing and (self.training or not self._is_initialized):
            self._decide_sign(x)
            self.observer(x.detach().float())  # statistics in float32 whatever the input's dtype
            if self.reduce_statistics is not None:
                observers.reduce_observed_range(self.observer, self.reduce_statistics)
            self._update_qparams()
        elif not self._is_initialized:
            return x
        qmin, qmax = self.qrange()
        return fake_quantize(x, self.scale, self.zero_point, qmin, qmax, self.ch_axis)

    def _on_bits_changed(self, old: int, new: int) -> None:
        if not self.observing:
            self._update_qparams()


class DynamicQuantizer(FakeQuantizer):
    """Per-token dynamic quantization of activations: every token (each row of the last axis) gets the step
    that maps its own range onto the grid, on every forward. Asymmetric configs use the token's [min, max]
    (widened to hold zero) and a zero point, symmetric ones max|x|. Gradients pass straight through (every
    value lies inside its token's range). Nothing is learned or initialised, so nothing is saved either.

    Example usage::

        q = DynamicQuantizer(QuantizerConfig(bits=8, granularity="per_token", symmetric=False))
        x_hat = q(torch.randn(2, 16, 64))     # 32 tokens, 32 steps
    """

    def __init__(
        self,
        config: QuantizerConfig,
        ch_axis: int | None = None,
        signed: bool | None = None,
        role: str = "activation",
    ):
        if not config.symmetric:
            signed = True  # an asymmetric grid is placed by its zero point; signed int8 as torchao's 8da4w
        super().__init__(config, None, signed, role)
        self.mark_initialized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_active:
            return x
        self._decide_sign(x)
        qmin, qmax = self.qrange()
        return fake_quantize_per_token(x, qmin, qmax, self.config.symmetric)

    def step_range(self) -> tuple[float, float] | None:
        return None  # dynamic: there is no stored step


def group_problem(config: QuantizerConfig, weight: torch.Tensor) -> str | None:
    """Why ``weight`` cannot be quantized in groups of ``config.group_size`` (its rows must split evenly)."""
    if config.granularity != "per_group":
        return None
    row = weight[0].numel() if weight.dim() > 0 else 1
    if row % config.group_size:
        return f"its rows hold {row} input elements, not a multiple of group_size {config.group_size}"
    return None


def make_quantizer(config: QuantizerConfig, role: str, ch_axis: int | None = None) -> FakeQuantizer:
    """Build the quantizer a config asks for. ``role`` is ``weight`` (signed, whole-tensor gradient
    scale) or ``activation`` (sign decided on the first batch unless the config is asymmetric).

    Example usage::

        make_quantizer(QuantizerConfig(bits=4, granularity="per_channel"), "weight", ch_axis=0)
    """
    problem = config.role_problem(role)
    if problem:
        raise ValueError(problem)
    signed = True if role == "weight" and config.symmetric else None
    if config.is_dynamic:
        return DynamicQuantizer(config, None, signed, role)
    cls = ObserverQuantizer if config.scheme == "observer" else LSQQuantizer
    return cls(config, ch_axis, signed, role)
