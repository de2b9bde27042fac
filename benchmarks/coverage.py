"""What gets quantized: fxquant vs torch.ao FX QAT, side by side in one process, per model.

Per model: the share of conv/linear weight elements whose weight is fake-quantized (``nn.MultiheadAttention``'s
packed projections and transformers' ``Conv1D`` count as linear weights), whether attention products (matmul,
bmm, einsum, fused attention) have quantized operands, and prepare time. Models: torchvision ViT-B/16, Swin-T,
Swin-V2-T, MaxViT-T; Hugging Face BERT, GPT-2, ViT, LLaMA and T5 built from small configs (nothing downloaded);
CNNs (ResNet-18, MobileNetV2). Brevitas and NNCF are not installed here; they are left out rather than guessed.

    python benchmarks/coverage.py [--models vit_b_16,swin_t] [--recipe lsq_w4a4]

Writes benchmarks/results/coverage.md and coverage.json.
"""

from __future__ import annotations

import argparse
import operator
import time
import warnings

import torch
import torchvision
from baselines import ao_prepare_qat_fx
from common import write_results
from tabulate import tabulate
from torch import fx, nn

import fxquant

PRODUCTS = {torch.matmul, torch.bmm, operator.matmul, torch.einsum, torch.nn.functional.scaled_dot_product_attention}


def _hf_models() -> dict:
    try:
        import transformers as t  # the benchmark's optional peer library, not an fxquant dependency
    except ImportError:
        return {}
    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    ids = torch.randint(0, 100, (2, 16))
    return {
        "hf_bert": (lambda: t.BertForSequenceClassification(t.BertConfig(vocab_size=100, **small)), (ids,)),
        "hf_gpt2": (lambda: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4)), (ids,)),
        "hf_vit": (
            lambda: t.ViTForImageClassification(t.ViTConfig(image_size=32, patch_size=8, num_labels=10, **small)),
            (torch.randn(2, 3, 32, 32),),
        ),
        "hf_llama": (lambda: t.LlamaForCausalLM(t.LlamaConfig(vocab_size=100, num_key_value_heads=2, **small)), (ids,)),
        "hf_t5": (
            lambda: t.T5EncoderModel(
                t.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
            ),
            (ids,),
        ),
    }


def models() -> dict:
    image = (torch.randn(1, 3, 224, 224),)
    tv = torchvision.models
    return {
        "vit_b_16": (lambda: tv.vit_b_16(weights=None), image),
        "swin_t": (lambda: tv.swin_t(weights=None), image),
        "swin_v2_t": (lambda: tv.swin_v2_t(weights=None), (torch.randn(1, 3, 256, 256),)),
        "maxvit_t": (lambda: tv.maxvit_t(weights=None), image),
        **_hf_models(),
        "resnet18": (lambda: tv.resnet18(weights=None), image),
        "mobilenet_v2": (lambda: tv.mobilenet_v2(weights=None), image),
    }


def linear_weights(model: nn.Module) -> dict[str, int]:
    """Every conv/linear weight by state_dict key, with its element count."""
    found = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or type(module).__name__ == "Conv1D":
            found[f"{prefix}weight"] = module.weight.numel()
        if isinstance(module, nn.MultiheadAttention):
            for p in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(module, p, None) is not None:
                    found[f"{prefix}{p}"] = getattr(module, p).numel()
    return found


def fxquant_quantized(qmodel: fxquant.QATModel) -> tuple[set[str], bool]:
    """(float state_dict keys of the weights fxquant quantizes, whether any attention product is quantized)."""
    by_id = {id(t): k for k, t in qmodel.model.state_dict(keep_vars=True).items()}
    prepared_to_float = {v.removeprefix("model."): k for k, v in qmodel._float_keys.items()}
    keys, products = set(), False
    for record in qmodel.report.layers:
        piece = qmodel.graph_modules()[record.piece]
        node = next(n for n in piece.graph.nodes if n.name == record.node)
        if record.op in ("matmul", "bmm", "einsum", "sdpa"):
            products = products or bool(record.activation_quantizers)
            continue
        if node.op == "call_module":
            weight = piece.get_submodule(node.target).weight
        else:
            source = node.args[2] if record.op == "addmm" else node.args[1]
            if source.op == "call_module":  # the weight quantizer; its input is the weight
                source = source.args[0]
            weight = piece.get_parameter(source.target) if source.op == "get_attr" else None
        if weight is not None:
            prefix = f"{record.piece}." if record.piece else ""
            key = by_id.get(id(weight), prefix)
            keys.add(prepared_to_float.get(key, key))
    return keys, products


def ao_quantized(prepared: fx.GraphModule) -> tuple[set[str], bool]:
    """(state_dict keys of torch.ao's fake-quantized weights, whether an attention product is quantized)."""
    keys = {f"{name}.weight" for name, m in prepared.named_modules() if hasattr(m, "weight_fake_quant")}
    products = False
    for node in prepared.graph.nodes:
        if (node.op == "call_function" and node.target in PRODUCTS) or (
            node.op == "call_method" and node.target == "matmul"
        ):
            inputs = [a for a in node.args if isinstance(a, fx.Node)]
            products = products or any(
                a.op == "call_module" and "activation_post_process" in str(a.target) for a in inputs
            )
    return keys, products


def share(keys: set[str], weights: dict[str, int]) -> float:
    total = sum(weights.values())
    return 100.0 * sum(n for k, n in weights.items() if k in keys) / total if total else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="")
    parser.add_argument("--recipe", default="lsq_w4a4")
    args = parser.parse_args()
    table = models()
    chosen = [m for m in args.models.split(",") if m] or list(table)
    rows, payload = [], {}
    for name in chosen:
        build, example = table[name]
        torch.manual_seed(0)
        model = build().eval()
        weights = linear_weights(model)
        start = time.perf_counter()
        qmodel = fxquant.prepare_qat(model, args.recipe)
        fx_seconds = time.perf_counter() - start
        fx_keys, fx_products = fxquant_quantized(qmodel)
        missing = sorted(k for k in weights if k not in fx_keys)
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ao = ao_prepare_qat_fx(model, example)
            ao_keys, ao_products = ao_quantized(ao)
            ao_share, ao_seconds, ao_note = share(ao_keys, weights), time.perf_counter() - start, ""
        except Exception as err:  # torch.ao FX traces the whole model or nothing
            ao_share, ao_products, ao_seconds = None, False, time.perf_counter() - start
            ao_note = f"fails: {type(err).__name__}"
        fx_share = share(fx_keys, weights)
        rows.append(
            [
                name,
                f"{fx_share:.1f}%",
                "yes" if fx_products else "no",
                f"{fx_seconds:.2f}",
                f"{ao_share:.1f}%" if ao_share is not None else ao_note,
                "yes" if ao_products else "no",
                f"{ao_seconds:.2f}",
            ]
        )
        payload[name] = {
            "weight_elements": sum(weights.values()),
            "fxquant_share": fx_share,
            "fxquant_products": fx_products,
            "fxquant_seconds": fx_seconds,
            "fxquant_missing": missing[:20],
            "ao_share": ao_share,
            "ao_products": ao_products,
            "ao_seconds": ao_seconds,
            "ao_note": ao_note,
        }
        print(rows[-1], flush=True)
    headers = [
        "model",
        "fxquant weights quantized",
        "fxquant attention products",
        "fxquant prepare s",
        "torch.ao FX weights quantized",
        "torch.ao products",
        "torch.ao prepare s",
    ]
    full = sum(1 for p in payload.values() if p["fxquant_share"] >= 99.999)
    md = (
        f"# Quantization coverage (recipe `{args.recipe}`)\n\n"
        + tabulate(rows, headers=headers, tablefmt="github")
        + f"\n\nfxquant quantizes every conv/linear weight on {full} of {len(payload)} models. Share = conv/linear "
        "weight elements (MultiheadAttention's packed projections and transformers' Conv1D included) whose weight "
        "is fake-quantized. torch.ao FX: `prepare_qat_fx` with its default x86 QAT qconfig mapping.\n"
    )
    write_results("coverage", md, {"recipe": args.recipe, "models": payload})


if __name__ == "__main__":
    main()
