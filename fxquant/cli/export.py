"""``fxquant export``: a checkpoint from ``fxquant train`` as QDQ ONNX, checked in onnxruntime on random inputs."""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fxquant.checkpoint import load
from fxquant.deploy import compare, convert, export_onnx
from fxquant.deploy.onnx_export import capture

from .common import add_device_argument, model_from_spec, positive_int, shape


def add_parser(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="export a QAT checkpoint to QDQ ONNX and check it in onnxruntime")
    export.add_argument("--model", required=True, help="the checkpoint's architecture: resnet20, torchvision:NAME ...")
    export.add_argument("--checkpoint", required=True, help="an fxquant checkpoint (fxquant train --out)")
    export.add_argument("--out", required=True, help="the .onnx file to write (and OUT.encodings.json)")
    export.add_argument("--format", choices=("qdq", "qcdq"), default="qdq")
    export.add_argument("--opset", type=positive_int, help="default 21 for qdq, 13 for qcdq")
    export.add_argument("--input", type=shape, default="1,1,28,28", help="example input shape")
    export.add_argument(
        "--fold-bn",
        action="store_true",
        help="fold BN into weight scales: integer kernels in onnxruntime, but an int32 bias rounding never trained for",
    )
    add_device_argument(export)
    export.set_defaults(func=run)


def gzip_size(path: Path) -> int:
    """Bytes of ``path`` gzipped (level 9): what a download costs."""
    return len(gzip.compress(path.read_bytes(), compresslevel=9))


def float_onnx_size(model: torch.nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(bytes, gzipped bytes) of ``model`` exported as plain FP32 ONNX, for comparison."""
    data = capture(model, (example,), 18).SerializeToString()
    return len(data), len(gzip.compress(data, compresslevel=9))


def run(args: argparse.Namespace) -> int:
    console = Console()
    qmodel = load(args.checkpoint, model_from_spec(args.model), map_location=args.device)
    example = torch.randn(*args.input, device="cpu")  # export works on a CPU copy
    opset = args.opset or (21 if args.format == "qdq" else 13)
    report = export_onnx(qmodel, args.out, example, format=args.format, opset=opset, fold_batch_norm=args.fold_bn)
    fp_bytes, fp_gzip = float_onnx_size(model_from_spec(args.model), example)
    table = Table(title=f"fxquant export · {args.out}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("format / opset", f"{report.format} / {report.opset}")
    table.add_row(
        "file", f"{report.bytes / 1e3:.1f} kB ({report.bytes / fp_bytes:.3f}× FP32 ONNX {fp_bytes / 1e3:.1f} kB)"
    )
    table.add_row("gzip", f"{gzip_size(report.path) / 1e3:.1f} kB (FP32 {fp_gzip / 1e3:.1f} kB)")
    table.add_row("weights by width", ", ".join(f"{b} bits: {n}" for b, n in sorted(report.weight_widths.items())))
    table.add_row(
        "activations by width", ", ".join(f"{b} bits: {n}" for b, n in sorted(report.activation_widths.items()))
    )
    table.add_row("BN folded into weight scales", str(report.folded_batch_norms))
    inputs = torch.randn(32, *args.input[1:], device="cpu")  # compared on the CPU, as onnxruntime runs
    for parity in compare(report.path, convert(qmodel), inputs):
        table.add_row(
            f"onnxruntime {parity.level} vs PyTorch (32 random inputs)",
            f"max |Δ| {parity.max_abs:.3g} = {parity.output_steps:.3g} output steps, top-1 agree "
            f"{100 * parity.top1_agreement:.1f}%",
        )
    table.add_row("encodings", str(report.encodings))
    console.print(table)
    return 0
