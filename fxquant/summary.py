"""Per-layer summary of a prepared model: bits, quantizers, steps, params, BOPs, size; opaque modules.

``format="rich"`` prints coloured tables to the terminal; ``"text"`` and ``"markdown"`` return tabulate text
for logs and reports. Every format returns the plain-text rendering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tabulate import tabulate

from fxquant.passes.patterns import functional_weight
from fxquant.qat_model import QATModel
from fxquant.search.cost import as_args, measure

FORMATS = ("rich", "text", "markdown")


@dataclass
class SummaryRow:
    layer: str
    op: str
    weight_bits: int | None
    activation_bits: int
    scheme: str
    granularity: str
    step_range: str
    params: int
    bops: int | None


def _fmt_big(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def collect(qmodel: QATModel, example_inputs: Any = None) -> tuple[list[SummaryRow], dict[str, Any]]:
    """Rows and totals of the summary, as data (what the printers and the CLI use)."""
    costs = qmodel.report.costs
    args = as_args(example_inputs)
    if args is not None:
        costs = measure(qmodel, args)
    rows: list[SummaryRow] = []
    seen_weights: set[int] = set()
    quantized_bits = 0.0
    quantized_params = 0
    macs_total = 0
    bops = {"model": 0, "fp32": 0, "w8a8": 0}
    for layer in qmodel.report.layers:
        wq, aqs = qmodel.layer_quantizers(layer)
        w_bits = wq.bits if wq is not None else None
        a_bits = max((q.bits for q in aqs), default=32)
        params = 0
        if wq is not None:
            piece = qmodel.graph_modules()[layer.piece]
            weight = _weight_of(piece, layer)
            if weight is not None and id(weight) not in seen_weights:
                seen_weights.add(id(weight))
                params = weight.numel()
                quantized_params += params
                quantized_bits += params * w_bits
        config = wq.config if wq is not None else (aqs[0].config if aqs else None)
        steps = wq.step_range() if wq is not None else None
        step_text = f"{steps[0]:.3g}–{steps[1]:.3g}" if steps else "-"
        layer_bops = None
        if costs is not None and layer.name in costs:
            macs = costs[layer.name].macs
            layer_bops = macs * (w_bits or 32) * a_bits
            macs_total += macs
            bops["model"] += layer_bops
            bops["fp32"] += macs * 32 * 32
            bops["w8a8"] += macs * 8 * 8
        rows.append(
            SummaryRow(
                layer=layer.name + (f" [{layer.role}]" if layer.role else ""),
                op=layer.op,
                weight_bits=w_bits,
                activation_bits=a_bits,
                scheme=config.scheme if config else "-",
                granularity=config.granularity if wq is not None and config else "per_tensor",
                step_range=step_text,
                params=params,
                bops=layer_bops,
            )
        )
    all_params = sum(p.numel() for p in qmodel.model.parameters())
    quantizer_params = sum(p.numel() for q in qmodel.quantizers().values() for p in q.parameters())
    float_params = all_params - quantizer_params - quantized_params
    totals = {
        "layers": len(rows),
        "params": all_params - quantizer_params,
        "size_bytes": (quantized_bits + float_params * 32) / 8,
        "size_fp32_bytes": (quantized_params + float_params) * 4,
        "size_w8a8_bytes": quantized_params + float_params * 4,
        "macs": macs_total if costs is not None else None,
        "bops": bops["model"] if costs is not None else None,
        "bops_fp32": bops["fp32"] if costs is not None else None,
        "bops_w8a8": bops["w8a8"] if costs is not None else None,
    }
    return rows, totals


def _weight_of(piece: Any, layer: Any) -> Any:
    node = next(n for n in piece.graph.nodes if n.name == layer.node)
    if node.op == "call_module":
        return piece.get_submodule(node.target).weight
    weight = functional_weight(node)
    if weight is not None and weight.op == "call_module":
        source = weight.args[0]
        if source.op == "get_attr":
            obj = piece
            for part in str(source.target).split("."):
                obj = getattr(obj, part)
            return obj
    return None


HEADERS = ["layer", "op", "W bits", "A bits", "scheme", "granularity", "W step range", "params", "BOPs"]


def _table_rows(rows: list[SummaryRow]) -> list[list[str]]:
    return [
        [
            r.layer,
            r.op,
            "-" if r.weight_bits is None else str(r.weight_bits),
            str(r.activation_bits),
            r.scheme,
            r.granularity,
            r.step_range,
            _fmt_big(r.params) if r.params else "-",
            _fmt_big(r.bops),
        ]
        for r in rows
    ]


def _total_rows(totals: dict[str, Any]) -> list[list[str]]:
    out = [
        [
            "model size",
            _fmt_bytes(totals["size_bytes"]),
            f"{totals['size_fp32_bytes'] / max(totals['size_bytes'], 1):.2f}× smaller than FP32",
            f"{totals['size_w8a8_bytes'] / max(totals['size_bytes'], 1):.2f}× smaller than W8A8",
        ]
    ]
    if totals["bops"] is not None:
        out.append(
            [
                "BOPs / sample",
                _fmt_big(totals["bops"]),
                f"{totals['bops_fp32'] / max(totals['bops'], 1):.2f}× fewer than FP32",
                f"{totals['bops_w8a8'] / max(totals['bops'], 1):.2f}× fewer than W8A8",
            ]
        )
    else:
        out.append(["BOPs / sample", "give example_inputs to count", "", ""])
    return out


def summary(qmodel: QATModel, example_inputs: Any = None, format: str = "rich") -> str:
    """Show what prepare_qat did to each layer; return the text.

    Example usage::

        qmodel = fxquant.prepare_qat(model, "lsq_w4a4", torch.randn(1, 3, 32, 32))
        fxquant.summary(qmodel)                      # rich tables in the terminal
        text = fxquant.summary(qmodel, format="markdown")
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    rows, totals = collect(qmodel, example_inputs)
    opaque = sorted(qmodel.report.opaque.items())
    fmt = "github" if format == "markdown" else "simple"
    parts = [
        f"fxquant summary — recipe {qmodel.recipe.name}, {totals['layers']} quantized ops",
        tabulate(_table_rows(rows), headers=HEADERS, tablefmt=fmt),
        tabulate(_total_rows(totals), headers=["total", "value", "vs FP32", "vs W8A8"], tablefmt=fmt),
    ]
    if opaque:
        parts.append(tabulate(opaque, headers=["kept opaque (float)", "reason"], tablefmt=fmt))
    swapped = sorted(qmodel.report.swapped.items())
    if swapped:
        parts.append(tabulate(swapped, headers=["captured by module swap", "how"], tablefmt=fmt))
    floating = sorted(qmodel.report.float_layers.items())
    if floating:
        parts.append(tabulate(floating, headers=["layer left in float", "reason"], tablefmt=fmt))
    text = "\n\n".join(parts) + "\n"
    if format == "rich":
        _print_rich(
            qmodel,
            rows,
            totals,
            {"kept opaque (float)": opaque, "captured by module swap": swapped, "layers left in float": floating},
        )
    return text


def _print_rich(
    qmodel: QATModel, rows: list[SummaryRow], totals: dict[str, Any], listings: dict[str, list[tuple[str, str]]]
) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    table = Table(title=f"fxquant · {qmodel.recipe.name} · {totals['layers']} quantized ops", show_lines=False)
    for header in HEADERS:
        table.add_column(header, justify="right" if header in ("W bits", "A bits", "params", "BOPs") else "left")
    colours = {2: "red", 3: "yellow", 4: "green", 8: "cyan"}
    for row, cells in zip(rows, _table_rows(rows)):
        style = colours.get(row.weight_bits or 32, "white")
        table.add_row(*cells[:2], f"[{style}]{cells[2]}[/]", *cells[3:])
    console.print(table)
    totals_table = Table(title="totals")
    for header in ("total", "value", "vs FP32", "vs W8A8"):
        totals_table.add_column(header)
    for cells in _total_rows(totals):
        totals_table.add_row(*cells)
    console.print(totals_table)
    for title, entries in listings.items():
        if entries:
            listing = Table(title=title)
            listing.add_column("module")
            listing.add_column("reason")
            for path, reason in entries:  # reasons quote error texts: never read them as markup
                listing.add_row(escape(path or "<root>"), escape(reason))
            console.print(listing)
