"""The shape of a recipe file: every table, key, type and range, and the validator that walks it.

A schema is made of three node kinds: :class:`Key` (a leaf value), :class:`Table` (fixed keys) and
:class:`TableList` (``[[x]]`` arrays of tables). Validation reports the first problem as a RecipeError with the
file, the key path (``quant.rule[2].weight.bits``) and, for an unknown key, the closest valid one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fxquant.errors import RecipeError, closest
from fxquant.spec import GRANULARITIES, INITS, OBSERVERS, SCHEMES, check_bits


@dataclass(frozen=True)
class Key:
    """A leaf: its accepted Python types, optional choices and an extra check returning an error text."""

    types: tuple[type, ...]
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None
    doc: str = ""


@dataclass(frozen=True)
class Table:
    keys: dict[str, Key | Table | TableList]
    doc: str = ""
    open: bool = False  # an open table maps any name to ``values`` (e.g. [taps])
    values: Key | Table | None = None


@dataclass(frozen=True)
class TableList:
    item: Table
    doc: str = ""


@dataclass(frozen=True)
class TaggedTableList:
    """``[[x]]`` tables whose valid keys depend on one tag key (``kind``): each variant is a Table."""

    tag: str
    variants: dict[str, Table]
    doc: str = ""


def _bits_check(value: Any) -> str | None:
    try:
        check_bits(value)
    except ValueError as err:
        return str(err)
    return None


def _positive(value: Any) -> str | None:
    return None if value > 0 else f"must be > 0, got {value}"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else f"must be >= 0, got {value}"


def _string_list(value: Any) -> str | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return None
    if isinstance(value, str):
        return None
    return "must be a string or a list of strings"


BITS = Key((int,), check=_bits_check, doc="2..8, or 16/32 for full precision")
NAMES = Key((str, list), check=_string_list)

QUANTIZER = Table(
    {
        "bits": BITS,
        "scheme": Key((str,), choices=SCHEMES),
        "granularity": Key((str,), choices=GRANULARITIES),
        "symmetric": Key((bool,)),
        "observer": Key((str,), choices=OBSERVERS),
        "init": Key((str,), choices=INITS, doc="learned step start: default (LSQ / min-max) or mse"),
    },
    doc="how one tensor is fake-quantized",
)
LAYER_BITS = Table({"weight_bits": BITS, "activation_bits": BITS})
RULE = Table(
    {
        "match": Table({"name": NAMES, "type": NAMES}),
        "weight": QUANTIZER,
        "activation": QUANTIZER,
    }
)

TRAIN = Table(
    {
        "epochs": Key((int,), check=_positive),
        "batch_size": Key((int,), check=_positive),
        "lr": Key((float, int), check=_positive),
        "quantizer_lr": Key((float, int), check=_positive),
        "weight_decay": Key((float, int), check=_non_negative),
        "momentum": Key((float, int), check=_non_negative),
        "optimizer": Key((str,), choices=("sgd", "adamw")),
        "schedule": Key((str,), choices=("cosine", "constant")),
        "warmup_epochs": Key((int,), check=_non_negative),
        "label_smoothing": Key((float, int), check=_non_negative),
    }
)


def _probability(value: Any) -> str | None:
    return None if 0 <= value <= 1 else f"must be in [0, 1], got {value}"


def _decay(value: Any) -> str | None:
    return None if 0 < value < 1 else f"must be in (0, 1), got {value}"


def _selector(value: Any) -> str | None:
    from fxquant.taps import parse_selector

    try:
        parse_selector(value)
    except ValueError as err:
        return str(err)
    return None


NUMBER = (float, int)
LOSS_COMMON = {
    "weight": Key(NUMBER, check=_non_negative, doc="multiplies the term (default 1)"),
    "ramp_epochs": Key(NUMBER, check=_non_negative, doc="sigmoid ramp-up of the weight over these epochs"),
}
LOSS_KINDS = {
    "kd": Table({**LOSS_COMMON, "T": Key(NUMBER, check=_positive, doc="temperature (default 4)")}),
    "dkd": Table(
        {
            **LOSS_COMMON,
            "T": Key(NUMBER, check=_positive, doc="temperature (default 4)"),
            "alpha": Key(NUMBER, check=_non_negative, doc="TCKD weight (default 1)"),
            "beta": Key(NUMBER, check=_non_negative, doc="NCKD weight (default 8)"),
        }
    ),
    "consistency": Table(
        {
            **LOSS_COMMON,
            "teacher": Key((str,), choices=("ema", "fp"), doc="EMA of the student (default) or the FP model"),
            "ema_decay": Key(NUMBER, check=_decay, doc="default 0.999"),
            "ema_warmup": Key((bool,), doc="decay min(ema_decay, 1 − 1/(t+1)) at step t, as Mean Teacher (true)"),
            "T": Key(NUMBER, check=_positive, doc="temperature of the logit KL (default 1)"),
            "logits": Key((bool,), doc="KL between softened logits (default true)"),
            "tap": Key((str,), doc="a tap name or selector for an extra feature MSE"),
            "feature_weight": Key(NUMBER, check=_non_negative, doc="weight of the feature MSE (default 1)"),
        }
    ),
    "fpq": Table(
        {
            **LOSS_COMMON,
            "p": Key(NUMBER, check=_probability, doc="perturbation probability per layer per forward (0.1)"),
            "layers": Key((str,), doc="op type perturbed and distilled (default Conv2d)"),
            "csd": Key((bool,), doc="channel-wise standardization distillation (default true)"),
            "normalize": Key((str,), choices=("mean", "batch", "sum"), doc="per-layer reduction (mean)"),
            "eps": Key(NUMBER, check=_positive, doc="variance epsilon (1e-5)"),
        }
    ),
    "mec": Table(
        {
            **LOSS_COMMON,
            "tap": Key((str,), doc="feature tap name or selector (default penultimate)"),
            "eps2": Key(NUMBER, check=_positive, doc="distortion ε² (default 64)"),
            "order": Key((int,), check=_positive, doc="Taylor order K (default 4)"),
            "experts": Key((int,), check=_positive, doc="channel-group experts (default 1 = plain MEC)"),
            "lambda_warmup_epochs": Key(NUMBER, check=_non_negative, doc="λ⁻¹ from 8/λ to 1/λ (default 1)"),
        }
    ),
}
for _kind, _table in LOSS_KINDS.items():
    _table.keys["kind"] = Key((str,), choices=(_kind,))


def _fraction(value: Any) -> str | None:
    return None if 0 < value <= 1 else f"must be in (0, 1] (a fraction of the training set), got {value}"


def _score_list(value: Any) -> str | None:
    if isinstance(value, list) and value and all(v in ("evs", "ds") for v in value):
        return None
    return f"must be a non-empty list of 'evs' and 'ds', got {value!r}"


CORESET_DOC = "adaptive coreset selection (ACS)"
DATA = Table(
    {
        "coreset": Table(
            {
                "fraction": Key(NUMBER, check=_fraction, doc="kept per class, in (0, 1]"),
                "refresh_every": Key((int,), check=_positive, doc="epochs between selections (default 10)"),
                "schedule": Key((str,), choices=("paper", "code_cosine", "linear"), doc="β(t) of EVS"),
                "scores": Key((list,), check=_score_list, doc='["evs", "ds"] (default both)'),
            },
            doc=CORESET_DOC,
        )
    }
)

ZEROSHOT = Table(
    {
        "iterations": Key((int,), check=_positive),
        "warmup_iterations": Key((int,), check=_non_negative, doc="generator-only iterations first"),
        "batch_size": Key((int,), check=_positive),
        "latent_dim": Key((int,), check=_positive),
        "generator_channels": Key((int,), check=_positive),
        "long_range": Key((bool,), doc="LRQ's large-kernel attention blocks in the generator"),
        "generator_lr": Key(NUMBER, check=_positive),
        "student_lr": Key(NUMBER, check=_positive),
        "student_optimizer": Key((str,), choices=("sgd", "adam"), doc="default sgd (momentum 0.9)"),
        "ama": Key((bool,), doc="additive angular margin in the generator's cross-entropy"),
        "margin": Key(NUMBER, check=_non_negative, doc="AMA margin m (radians)"),
        "scale": Key(NUMBER, check=_positive, doc="AMA logit scale s"),
        "bns_weight": Key(NUMBER, check=_non_negative, doc="BN-statistics matching weight"),
        "distill": Key((str,), choices=("dkd", "kd"), doc="student loss"),
        "T": Key(NUMBER, check=_positive),
        "alpha": Key(NUMBER, check=_non_negative),
        "beta": Key(NUMBER, check=_non_negative),
        "seed": Key((int,)),
    },
    doc="zero-shot quantization (LRQ)",
)

OPTIM = Table(
    {
        "sam": Table(
            {
                "rho": Key(NUMBER, check=_positive, doc="neighbourhood radius (default 0.05)"),
                "adaptive": Key((bool,), doc="ASAM's scale-invariant neighbourhood"),
                "perturb": Key((str,), choices=("quantized", "latent"), doc="where ε is added (SAQ: quantized)"),
                "perturb_bn": Key((bool,), doc="also perturb BN affine parameters"),
                "perturb_steps": Key((bool,), doc="also perturb activation quantizer steps"),
                "update_bn_in_second_pass": Key((bool,), doc="default false"),
            },
            doc="sharpness-aware minimization (SAQ)",
        )
    }
)


def _candidates(value: Any) -> str | None:
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return _bits_check(max(value)) or _bits_check(min(value))
    return "must be a non-empty list of bit widths"


BITS_TABLE = Table({"plan": Key((str,), doc="a bit-plan TOML (from fxquant search), relative to this recipe")})
SEARCH = Table(
    {
        "method": Key((str,), choices=("hessian", "sam", "saq"), doc="sensitivity measure, or SAQ's generator"),
        "iterations": Key((int,), check=_positive, doc="generator iterations for method = saq (default 100)"),
        "budget": Key((str,), doc="0.25xW8A8, 0.5xFP32, avg3, 1.2e9 or size:150kB"),
        "candidates": Key((list,), check=_candidates, doc="bit widths to choose from (default [2, 3, 4, 8])"),
        "batches": Key((int,), check=_positive, doc="calibration batches (default 2)"),
        "tol": Key(NUMBER, check=_positive, doc="Hutchinson relative tolerance (default 0.05)"),
        "max_iterations": Key((int,), check=_positive, doc="Hutchinson iterations at most (default 50)"),
        "rho": Key(NUMBER, check=_positive, doc="SAM radius for method = sam (default 0.05)"),
        "search_first_last": Key(
            (bool,), doc="search the first/last layers' widths too; avgB budgets still count them at 8 bits"
        ),
    },
    doc="per-layer bit search before training",
)

SCHEMA = Table(
    {
        "name": Key((str,)),
        "description": Key((str,)),
        "extends": Key((str,)),
        "quant": Table(
            {
                "weight": QUANTIZER,
                "activation": QUANTIZER,
                "first_layer": LAYER_BITS,
                "last_layer": LAYER_BITS,
                "bn": Key((str,), choices=("keep", "fold")),
                "leaf_modules": NAMES,
                "rule": TableList(RULE),
            }
        ),
        "train": TRAIN,
        "taps": Table({}, open=True, values=Key((str,), check=_selector), doc="tap name = selector"),
        "loss": TaggedTableList("kind", LOSS_KINDS),
        "data": DATA,
        "zeroshot": ZEROSHOT,
        "optim": OPTIM,
        "bits": BITS_TABLE,
        "search": SEARCH,
    }
)


def type_name(types: tuple[type, ...]) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def validate(data: Any, schema: Table | TableList | TaggedTableList | Key, source: str, path: str = "") -> None:
    """Raise RecipeError at the first value of ``data`` that does not fit ``schema``.

    Example usage::

        validate({"quant": {"weight": {"bits": 9}}}, SCHEMA, "my.toml")   # RecipeError: quant.weight.bits
    """
    if isinstance(schema, Key):
        _validate_key(data, schema, source, path)
    elif isinstance(schema, (TableList, TaggedTableList)):
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise RecipeError(source, path, "must be an array of tables ([[...]] in TOML)")
        for i, item in enumerate(data):
            if isinstance(schema, TableList):
                validate(item, schema.item, source, f"{path}[{i}]")
                continue
            tag = item.get(schema.tag)
            if tag not in schema.variants:
                kinds = sorted(schema.variants)
                suggestion = closest(tag, kinds) if isinstance(tag, str) else None
                raise RecipeError(
                    source, f"{path}[{i}].{schema.tag}", f"must be one of {', '.join(kinds)}; got {tag!r}", suggestion
                )
            validate(item, schema.variants[tag], source, f"{path}[{i}]")
    else:
        if not isinstance(data, dict):
            raise RecipeError(source, path, "must be a table")
        for key, value in data.items():
            sub = f"{path}.{key}" if path else key
            if key in schema.keys:
                validate(value, schema.keys[key], source, sub)
            elif schema.open and schema.values is not None:
                validate(value, schema.values, source, sub)
            else:
                valid = sorted(schema.keys)
                raise RecipeError(source, sub, f"unknown key; valid keys here: {', '.join(valid)}", closest(key, valid))


def _validate_key(value: Any, key: Key, source: str, path: str) -> None:
    # bool is an int in Python: reject True where a number is expected, and 1 where a bool is.
    ok = isinstance(value, key.types) and not (isinstance(value, bool) and bool not in key.types)
    if not ok:
        raise RecipeError(source, path, f"must be {type_name(key.types)}, got {value!r}")
    if key.choices is not None and value not in key.choices:
        suggestion = closest(value, [str(c) for c in key.choices]) if isinstance(value, str) else None
        raise RecipeError(source, path, f"must be one of {', '.join(map(str, key.choices))}; got {value!r}", suggestion)
    if key.check is not None:
        problem = key.check(value)
        if problem:
            raise RecipeError(source, path, problem)


def describe(schema: Table | TableList | TaggedTableList | Key = SCHEMA, path: str = "") -> list[tuple[str, str]]:
    """Every key path of the schema with what it accepts."""
    if isinstance(schema, Key):
        text = type_name(schema.types)
        if schema.choices:
            text += f" in {{{', '.join(map(str, schema.choices))}}}"
        if schema.doc:
            text += f" ({schema.doc})"
        return [(path, text)]
    if isinstance(schema, TableList):
        return describe(schema.item, f"{path}[]")
    if isinstance(schema, TaggedTableList):
        return [row for kind, table in schema.variants.items() for row in describe(table, f"{path}[kind={kind}]")]
    rows: list[tuple[str, str]] = []
    for key, sub in schema.keys.items():
        rows.extend(describe(sub, f"{path}.{key}" if path else key))
    return rows
