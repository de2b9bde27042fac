"""Export: file size, onnxruntime latency and parity of fxquant's QDQ ONNX files, per model and width.

    python benchmarks/export.py                 # resnet20, mobilenet_v2_small, torchvision resnet18 and mobilenet_v2
    python benchmarks/export.py --zoo           # every torchvision classification model at W4A4 and W8A8: exports?

Per row: FP32 ONNX bytes, QDQ bytes and the ratio, gzip bytes; onnxruntime latency (CPU provider, ORT_ENABLE_ALL,
median of timed runs after warm-up) at batch 1 and 32 for the QDQ file and the FP32 file in the same process, and
their ratio; parity with the converted PyTorch model in output steps (see fxquant.deploy.parity) at both
optimisation levels, and top-1 agreement. Models are calibrated on random inputs, not trained: parity and latency
do not depend on training, accuracy does (that is tests/test_deploy_slow.py's trained resnet20). Timing needs the
machine to itself. Writes benchmarks/results/export.md (and export_zoo.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torchvision
from common import write_results
from tabulate import tabulate

import fxquant
from fxquant.cli.export import gzip_size
from fxquant.deploy import compare, convert, export_onnx
from fxquant.deploy.onnx_export import capture
from fxquant.deploy.parity import run, session

MODELS = {
    "resnet20": (lambda: fxquant.models.resnet20(), (1, 28, 28)),
    "mobilenet_v2_small": (lambda: fxquant.models.mobilenet_v2_small(), (1, 28, 28)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 64, 64)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (3, 64, 64)),
}
WIDTHS = {"W8A8": 8, "W4A4": 4, "W2A2": 2}


def _recipe(bits: int) -> dict:
    return {"extends": "lsq_w8a8", "quant": {"weight": {"bits": bits}, "activation": {"bits": bits}}}


def _latency(path: Path, x: torch.Tensor, repeats: int, threads: int) -> float:
    sess = session(path, "enable_all", threads)
    for _ in range(3):
        run(sess, (x,))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(sess, (x,))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, width: str, folder: Path, repeats: int, threads: int) -> dict:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    x32 = torch.randn(32, *shape)
    qmodel = fxquant.prepare_qat(model, _recipe(WIDTHS[width]))
    fxquant.calibrate(qmodel, x32)
    report = export_onnx(qmodel, folder / f"{name}_{width}.onnx", x32[:1])
    folded = export_onnx(qmodel, folder / f"{name}_{width}_folded.onnx", x32[:1], fold_batch_norm=True)
    fp_path = folder / f"{name}_fp32.onnx"
    if not fp_path.exists():
        fp_path.write_bytes(capture(model, (x32[:1],), 18).SerializeToString())
    parity = {p.level: p for p in compare(report.path, convert(qmodel), x32)}
    row = {
        "model": name,
        "width": width,
        "fp32_bytes": fp_path.stat().st_size,
        "qdq_bytes": report.bytes,
        "fp32_gzip": gzip_size(fp_path),
        "qdq_gzip": gzip_size(report.path),
        "folded_bn": folded.folded_batch_norms,
        "steps_disable_all": parity["disable_all"].output_steps,
        "steps_enable_all": parity["enable_all"].output_steps,
        "agree_disable_all": parity["disable_all"].top1_agreement,
        "agree_enable_all": parity["enable_all"].top1_agreement,
    }
    for batch in (1, 32):
        x = x32[:batch]
        # interleaved: quantized then float, twice, so that drift in machine load hits both alike
        times: dict[str, list[float]] = {"qdq": [], "folded": [], "fp32": []}
        for _ in range(2):
            for key, path in (("qdq", report.path), ("folded", folded.path), ("fp32", fp_path)):
                times[key].append(_latency(path, x, repeats, threads))
        for key, values in times.items():
            row[f"ms_{key}_b{batch}"] = 1000 * min(values)
    print(row, flush=True)
    return row


def main_models(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for width in args.widths.split(","):
                rows.append(bench(name, width, Path(tmp), args.repeats, args.threads))
    table = tabulate(
        [
            [
                r["model"],
                r["width"],
                f"{r['fp32_bytes'] / 1e3:.0f} kB",
                f"{r['qdq_bytes'] / 1e3:.0f} kB",
                f"{r['qdq_bytes'] / r['fp32_bytes']:.3f}",
                f"{r['qdq_gzip'] / 1e3:.0f} / {r['fp32_gzip'] / 1e3:.0f} kB",
                f"{r['ms_qdq_b1']:.2f} / {r['ms_folded_b1']:.2f} / {r['ms_fp32_b1']:.2f} "
                f"({r['ms_qdq_b1'] / r['ms_fp32_b1']:.2f}× / {r['ms_folded_b1'] / r['ms_fp32_b1']:.2f}×)",
                f"{r['ms_qdq_b32']:.1f} / {r['ms_folded_b32']:.1f} / {r['ms_fp32_b32']:.1f} "
                f"({r['ms_qdq_b32'] / r['ms_fp32_b32']:.2f}× / {r['ms_folded_b32'] / r['ms_fp32_b32']:.2f}×)",
                f"{r['steps_disable_all']:.3g} / {r['steps_enable_all']:.3g}",
                f"{100 * r['agree_disable_all']:.1f} / {100 * r['agree_enable_all']:.1f}",
            ]
            for r in rows
        ],
        headers=[
            "model", "width", "FP32 ONNX", "QDQ", "QDQ / FP32", "gzip QDQ / FP32",
            "ms batch 1: QDQ / BN folded / FP32 (× FP32)", "ms batch 32: QDQ / BN folded / FP32 (× FP32)",
            "parity, output steps (disable / enable all)", "top-1 agree % (32 random)",
        ],
        tablefmt="github",
    )  # fmt: skip
    text = (
        "# Export: QDQ ONNX size, onnxruntime latency and parity\n\n"
        "onnxruntime CPU provider, "
        f"{args.threads} intra-op threads, ORT_ENABLE_ALL for latency (median of {args.repeats} runs, best of two "
        "interleaved rounds). Models calibrated on random inputs (untrained): sizes, latency and parity do not "
        "depend on training. INT4 weights on onnxruntime's CPU provider are storage, not speed: they are "
        "dequantized to float for the convolution; int8 QDQ groups fuse into integer kernels — only with BN "
        "folded (`fold_batch_norm=True`), which is not the default because onnxruntime then rounds conv biases to "
        "int32 (see fxquant.deploy.export_onnx). Parity and sizes are of the default (BN kept) file.\n\n"
        f"{table}\n"
    )
    write_results("export", text, {"rows": rows})


def main_zoo(args: argparse.Namespace) -> None:
    rows = []
    names = torchvision.models.list_models(module=torchvision.models)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for bits in (4, 8):
                kwargs = {"weights": None}
                if name.startswith(("inception", "googlenet")):
                    kwargs["init_weights"] = False
                size = (
                    299 if name.startswith("inception") else 224 if name.startswith(("vit", "swin", "maxvit")) else 64
                )
                start = time.perf_counter()
                try:
                    torch.manual_seed(0)
                    model = torchvision.models.get_model(name, **kwargs).eval()
                    qmodel = fxquant.prepare_qat(model, _recipe(bits))
                    x = torch.randn(2, 3, size, size)
                    fxquant.calibrate(qmodel, x)
                    report = export_onnx(qmodel, Path(tmp) / "m.onnx", x[:1])
                    (parity,) = compare(report.path, convert(qmodel), x, levels=("disable_all",))
                    rows.append({"model": name, "bits": bits, "ok": True, "steps": parity.output_steps,
                                 "agree": parity.top1_agreement, "seconds": time.perf_counter() - start})  # fmt: skip
                except Exception as err:  # a row per failure, with its reason
                    reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
                    rows.append({"model": name, "bits": bits, "ok": False, "error": reason,
                                 "seconds": time.perf_counter() - start})  # fmt: skip
                    traceback.print_exc()
                print(rows[-1], flush=True)
    done = sum(r["ok"] for r in rows)
    table = tabulate(
        [
            [
                r["model"],
                r["bits"],
                "yes" if r["ok"] else "no",
                f"{r['steps']:.3g}" if r["ok"] else r["error"],
                f"{100 * r['agree']:.0f}" if r["ok"] else "",
                f"{r['seconds']:.0f}",
            ]
            for r in rows
        ],
        headers=[
            "model",
            "W/A bits",
            "exports",
            "parity (output steps, ORT_DISABLE_ALL) / error",
            "top-1 agree %",
            "s",
        ],
        tablefmt="github",
    )
    text = (
        "# Export: every torchvision classification model\n\n"
        f"{done} of {len(rows)} exports ran in "
        "onnxruntime.\n\n"
        f"{table}\n"
    )
    write_results("export_zoo", text, {"rows": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", action="store_true", help="every torchvision classification model instead")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--widths", default=",".join(WIDTHS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    (main_zoo if args.zoo else main_models)(args)


if __name__ == "__main__":
    main()
