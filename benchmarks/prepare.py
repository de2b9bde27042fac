"""Prepare time and node count: fxquant.prepare_qat vs torch.ao prepare_qat_fx, side by side in one process.

Part 1: every torchvision classification model (each timed alternately, median of --repeats runs).
Part 2: a synthetic chain of N conv/relu blocks, to show how prepare time grows with graph size.

    python benchmarks/prepare.py [--repeats 3] [--models resnet18,vit_b_16] [--chain 100,1000,5000,20000]

Writes benchmarks/results/prepare.md and prepare.json. Ratios, not seconds, are what to compare across machines.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torchvision
from common import write_results
from tabulate import tabulate
from torch import nn

import fxquant


def _ao_prepare(model: nn.Module, example: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), (example,))


def _time(fn, repeats: int) -> tuple[float | None, object, str]:
    times, result, error = [], None, ""
    for _ in range(repeats):
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as err:  # torch.ao cannot trace some models: report, don't crash
            return None, None, f"{type(err).__name__}: {str(err).splitlines()[0][:60]}"
        times.append(time.perf_counter() - start)
    return statistics.median(times), result, error


def _nodes(prepared) -> int:
    if prepared is None:
        return 0
    if isinstance(prepared, fxquant.QATModel):
        return sum(len(gm.graph.nodes) for gm in prepared.graph_modules().values())
    return len(prepared.graph.nodes)


def bench_models(names: list[str], repeats: int) -> list[dict]:
    rows = []
    for name in names:
        kwargs = {"weights": None}
        if name.startswith(("inception", "googlenet")):
            kwargs["init_weights"] = False
        model = torchvision.models.get_model(name, **kwargs).train()
        size = 299 if name.startswith("inception") else 224
        example = torch.randn(1, 3, size, size)
        ours, q, _ = _time(lambda model=model: fxquant.prepare_qat(model, "lsq_w4a4"), repeats)
        theirs, a, err = _time(lambda model=model, example=example: _ao_prepare(model, example), repeats)
        row = {
            "model": name,
            "fxquant_s": ours,
            "fxquant_nodes": _nodes(q),
            "torch_ao_s": theirs,
            "torch_ao_nodes": _nodes(a),
            "ratio": (ours / theirs) if theirs else None,
            "torch_ao_error": err,
        }
        rows.append(row)
        print(f"{name:24s} fxquant {ours:.3f}s  torch.ao {theirs if theirs else float('nan'):.3f}s  {err}", flush=True)
    return rows


class Chain(nn.Module):
    def __init__(self, blocks: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 1) for _ in range(blocks))

    def forward(self, x):
        for conv in self.convs:
            x = torch.relu(conv(x))
        return x


AO_CHAIN_LIMIT = 1200  # torch.ao grows faster than linearly: 20,000 nodes would take hours


def bench_chain(sizes: list[int]) -> list[dict]:
    rows = []
    for blocks in sizes:
        model = Chain(blocks)
        ours, _, _ = _time(lambda model=model: fxquant.prepare_qat(model, "lsq_w4a4"), 1)
        if blocks * 4 <= AO_CHAIN_LIMIT:
            theirs, _, err = _time(lambda model=model: _ao_prepare(model, torch.randn(1, 4, 2, 2)), 1)
        else:
            theirs, err = None, f"not run above {AO_CHAIN_LIMIT} nodes (superlinear growth)"
        nodes = len(torch.fx.symbolic_trace(model).graph.nodes)
        rows.append(
            {
                "traced_nodes": nodes,
                "fxquant_s": ours,
                "fxquant_us_per_node": ours / nodes * 1e6,
                "torch_ao_s": theirs,
                "ratio": ours / theirs if theirs else None,
                "torch_ao_error": err,
            }
        )
        print(
            f"chain {nodes:6d} nodes: fxquant {ours:.2f}s ({ours / nodes * 1e6:.0f} µs/node)  torch.ao {theirs} {err}"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="all", help="comma-separated torchvision names, or 'all'")
    parser.add_argument("--chain", default="100,1000,5000,20000", help="node counts (approximate) of the chain")
    args = parser.parse_args()
    torch.set_num_threads(2)
    names = (
        torchvision.models.list_models(module=torchvision.models) if args.models == "all" else args.models.split(",")
    )
    model_rows = bench_models(names, args.repeats)
    chain_rows = bench_chain([max(1, int(n) // 4) for n in args.chain.split(",")])

    ratios = [r["ratio"] for r in model_rows if r["ratio"] is not None]
    median_ratio = statistics.median(ratios) if ratios else None
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else v)  # noqa: E731
    model_table = tabulate(
        [
            [
                r["model"],
                fmt(r["fxquant_s"]),
                r["fxquant_nodes"],
                fmt(r["torch_ao_s"]),
                r["torch_ao_nodes"] or "-",
                fmt(r["ratio"]),
                r["torch_ao_error"],
            ]
            for r in model_rows
        ],
        headers=["model", "fxquant s", "nodes", "torch.ao s", "nodes", "fxquant/torch.ao", "torch.ao error"],
        tablefmt="github",
    )
    chain_table = tabulate(
        [
            [
                r["traced_nodes"],
                fmt(r["fxquant_s"]),
                f"{r['fxquant_us_per_node']:.0f}",
                fmt(r["torch_ao_s"]),
                fmt(r["ratio"]),
                r["torch_ao_error"],
            ]
            for r in chain_rows
        ],
        headers=["traced nodes", "fxquant s", "fxquant µs/node", "torch.ao s", "fxquant/torch.ao", "note"],
        tablefmt="github",
    )
    text = (
        "# prepare_qat time: fxquant vs torch.ao prepare_qat_fx\n\n"
        f"{torch.get_num_threads()} threads. fxquant recipe lsq_w4a4; torch.ao default x86 QAT qconfig.\n\n"
        f"Median fxquant/torch.ao time ratio over {len(ratios)} models: **{fmt(median_ratio)}** "
        f"(goal ≤ 1.0; {sum(r <= 1.0 for r in ratios)} of {len(ratios)} models at or below 1.0).\n\n"
        f"{model_table}\n\n## Growth with graph size (synthetic conv/relu chain)\n\n{chain_table}\n"
    )
    write_results("prepare", text, {"models": model_rows, "chain": chain_rows, "median_ratio": median_ratio})


if __name__ == "__main__":
    main()
