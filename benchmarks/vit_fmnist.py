"""The transformer path learns: a small ViT trained from scratch on Fashion-MNIST, then QAT at W8A8 and W4A4.

``fxquant.models.vit_tiny`` (torchvision's VisionTransformer: 7×7 patches, 4 layers, width 64, 4 heads — its
attention is ``nn.MultiheadAttention``, quantized with both products) is trained in float with AdamW, cached,
then prepared with ``lsq_w8a8`` and ``lsq_w4a4`` (every linear layer, both attention products, first and last
layer at 8 bits in W4A4) and fine-tuned. Reports top-1 on the 10,000 test images next to FP.

    python benchmarks/vit_fmnist.py [--train-images 60000] [--fp-epochs 10] [--qat-epochs 3] [--seed 0]

Writes benchmarks/results/vit_fmnist.md and vit_fmnist.json. Goal (issue 15): W8A8 within 0.5 pt of FP.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import CACHE, write_results
from tabulate import tabulate

import fxquant
from fxquant.config import TrainConfig
from fxquant.data import fashion_mnist
from fxquant.workflow import cached_float_model

FP_TRAINING = TrainConfig(optimizer="adamw", lr=2e-3, weight_decay=0.05, batch_size=128, schedule="cosine")
QAT_TRAINING = {"optimizer": "adamw", "lr": 1e-4, "quantizer_lr": 1e-3, "weight_decay": 0.0, "batch_size": 128}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=60000)
    parser.add_argument("--fp-epochs", type=int, default=10)
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipes", default="lsq_w8a8,lsq_w4a4")
    args = parser.parse_args()
    torch.set_num_threads(2)
    train = fashion_mnist("train", augment="standard", limit=args.train_images)
    test = fashion_mnist("test")
    loader = torch.utils.data.DataLoader(test, batch_size=512)
    key = f"vit_tiny_fp_adamw_{args.train_images}x{args.fp_epochs}_seed{args.seed}"
    fp, fp_seconds = cached_float_model(
        fxquant.models.vit_tiny,
        key,
        train,
        args.fp_epochs,
        args.seed,
        CACHE,
        description="FP32 ViT",
        config=FP_TRAINING,
    )
    fp_top1 = fxquant.evaluate(fp, loader)["top1"]
    rows = [["FP32", f"{fp_top1:.2f}", "-", f"{fp_seconds:.0f}" if fp_seconds else "cached", "-"]]
    payload = {"fp": {"top1": fp_top1, "seconds": fp_seconds, "checkpoint": key}, "qat": {}}
    for recipe in [r for r in args.recipes.split(",") if r]:
        torch.manual_seed(args.seed)
        qmodel = fxquant.prepare_qat(fp, recipe, torch.randn(2, 1, 28, 28))
        products = sum(r.op == "matmul" for r in qmodel.report.layers)
        start = time.perf_counter()
        history = fxquant.fit(
            qmodel, train, loader, {**QAT_TRAINING, "epochs": args.qat_epochs}, description=recipe, seed=args.seed
        )
        seconds = time.perf_counter() - start
        top1 = fxquant.evaluate(qmodel, loader)["top1"]
        rows.append([recipe, f"{top1:.2f}", f"{top1 - fp_top1:+.2f}", f"{seconds:.0f}", str(products)])
        payload["qat"][recipe] = {
            "top1": top1,
            "delta": top1 - fp_top1,
            "seconds": seconds,
            "attention_products_quantized": products,
            "epoch_top1": [r.test_top1 for r in history],
        }
        print(rows[-1], flush=True)
    md = (
        "# Small ViT on Fashion-MNIST: FP vs QAT\n\n"
        f"vit_tiny (torchvision VisionTransformer, 7×7 patches, 4 layers, width 64), FP trained from scratch "
        f"({args.train_images} images × {args.fp_epochs} epochs, AdamW), then QAT for {args.qat_epochs} epochs "
        "(AdamW, lr 1e-4, quantizer lr 1e-3). Top-1 on the 10,000 test images. An accuracy run: `train s` is wall "
        "time and means something only when the run had the machine to itself.\n\n"
        + tabulate(rows, headers=["model", "top-1 %", "Δ vs FP", "train s", "attention products"], tablefmt="github")
        + "\n"
    )
    write_results("vit_fmnist", md, {"settings": vars(args), **payload})


if __name__ == "__main__":
    main()
