"""``fxquant summary``: prepare a model and print its per-layer summary."""

from __future__ import annotations

import argparse

import torch

from fxquant.api import prepare_qat
from fxquant.summary import summary

from .common import model_from_spec, shape


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("summary", help="prepare a model and print its per-layer summary")
    parser.add_argument("--model", required=True, help="torchvision:NAME, resnet20 or mobilenet_v2_small")
    parser.add_argument("--recipe", default="lsq_w4a4")
    parser.add_argument("--input", type=shape, default="1,3,224,224", help="example input shape")
    parser.add_argument("--format", choices=("rich", "text", "markdown"), default="rich")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    qmodel = prepare_qat(model_from_spec(args.model), args.recipe, torch.randn(*args.input, device="cpu"))
    text = summary(qmodel, format=args.format)
    if args.format != "rich":
        print(text)
    return 0
