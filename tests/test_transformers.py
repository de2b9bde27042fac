"""Hugging Face models built from small configs (nothing downloaded): prepared, trained, and quantized through.

Each model keeps its output type; with quantizers off it computes what the float model computes (its "sdpa"
attention is the reference); every linear layer (GPT-2's Conv1D included) is quantized, and so are both
attention products of every attention module; embeddings stay float and are listed as such.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxquant
from fxquant.quant.controls import disable_quant

transformers = pytest.importorskip("transformers")

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


def _models():
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return {
        "bert": (
            transformers.BertForSequenceClassification(transformers.BertConfig(vocab_size=100, **SMALL)),
            (ids,),
            {},
        ),
        "gpt2": (
            transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4)),
            (ids,),
            {},
        ),
        "vit": (
            transformers.ViTForImageClassification(
                transformers.ViTConfig(image_size=32, patch_size=8, num_labels=10, **SMALL)
            ),
            (pixels,),
            {},
        ),
        "llama": (
            transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=100, num_key_value_heads=2, **SMALL)),
            (ids,),
            {},
        ),
        "t5": (
            transformers.T5ForConditionalGeneration(
                transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
            ),
            (ids,),
            {"decoder_input_ids": ids[:, :5]},
        ),
    }


def _linear_layers(model: nn.Module) -> dict[str, int]:
    return {
        name: m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
    }


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit", "llama", "t5"])
def test_hf_model_prepares_quantizes_and_trains(name):
    torch.manual_seed(0)
    model, args, kwargs = _models()[name]
    model.eval()
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4").eval()
    with torch.no_grad(), disable_quant(qmodel):
        out = qmodel(*args, **kwargs)
        ref = model(*args, **kwargs)
    assert type(out) is type(ref)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-4)

    layers = _linear_layers(model)
    quantized = {r.name for r in qmodel.report.layers}
    assert set(layers) <= quantized, sorted(set(layers) - quantized)
    attention = [p for p, how in qmodel.report.swapped.items() if "attention products" in how]
    products = [r for r in qmodel.report.layers if r.op == "matmul"]
    assert attention and len(products) == 2 * len(attention)
    assert all(len(r.activation_quantizers) == 2 for r in products)
    embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    assert all(e in qmodel.report.float_layers for e in embeddings if not e.endswith("relative_attention_bias"))

    qmodel.train()
    out = qmodel(*args, **kwargs)
    loss = out.logits.float().logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    grads = [q.scale.grad for q in qmodel.quantizers().values() if getattr(q, "scale", None) is not None]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    # the user's model still runs its own attention
    assert model.config._attn_implementation != "fxquant"


def test_gpt2_conv1d_quantized_per_output_channel():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4))
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4")
    records = {r.name: r for r in qmodel.report.layers}
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"):
        weight_q, _ = qmodel.layer_quantizers(records[name])
        conv1d = model.get_submodule(name)
        weight_q(conv1d.weight)  # initialise
        assert weight_q.scale.shape == (conv1d.weight.shape[1],)  # Conv1D stores (in, out): one step per out


def test_hf_llm_recipe_groups_weights():
    config = transformers.LlamaConfig(vocab_size=100, num_key_value_heads=2, **{**SMALL, "hidden_size": 64})
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 100, (2, 6))
    qmodel = fxquant.prepare_qat(model, "llm_w4a8")
    grouped = [r for r in qmodel.report.layers if r.spec.weight is not None]
    assert grouped and all(qmodel.layer_quantizers(r)[0].group_size == 32 for r in grouped)
    loss = qmodel(ids).logits.logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss)


def test_embeddings_quantized_weight_only_when_a_rule_selects_them():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=100, num_key_value_heads=2, **SMALL))
    ids = torch.randint(0, 100, (2, 6))
    recipe = {"extends": "lsq_w4a4", "quant": {"rule": [{"match": {"type": "embedding"}, "weight": {"bits": 4}}]}}
    qmodel = fxquant.prepare_qat(model, recipe)
    (embed,) = [r for r in qmodel.report.layers if r.op.lower() == "embedding"]
    weight_q, activation_qs = qmodel.layer_quantizers(embed)
    assert embed.name == "model.embed_tokens" and weight_q.bits == 4 and not activation_qs
    assert "model.embed_tokens" not in qmodel.report.float_layers
    qmodel.eval()
    with torch.no_grad(), disable_quant(qmodel):
        torch.testing.assert_close(qmodel(ids).logits, model.eval()(ids).logits, atol=1e-5, rtol=1e-4)
    qmodel.train()
    qmodel(ids).logits.logsumexp(-1).mean().backward()
    assert weight_q.scale.grad is not None


def test_padding_masks_reach_the_quantized_attention():
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0
    for model in (
        transformers.BertModel(transformers.BertConfig(vocab_size=100, **SMALL)),
        transformers.LlamaModel(transformers.LlamaConfig(vocab_size=100, num_key_value_heads=2, **SMALL)),
        transformers.GPT2Model(transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4)),
    ):
        model.eval()
        qmodel = fxquant.prepare_qat(model, "lsq_w4a4").eval()
        with torch.no_grad(), disable_quant(qmodel):
            out = qmodel(ids, attention_mask=mask).last_hidden_state
            ref = model(ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-4)


def test_state_dict_round_trip_reproduces_outputs():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4))
    ids = torch.randint(0, 100, (2, 7))
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4")
    qmodel(ids).logits.sum().backward()  # initialise the steps
    qmodel.eval()
    again = fxquant.prepare_qat(model, "lsq_w4a4")
    again.load_state_dict(qmodel.state_dict())
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, qmodel(ids).logits)


def test_rules_select_hf_attention_by_its_class():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=100, num_key_value_heads=2, **SMALL))
    rule = {"match": {"type": "LlamaAttention"}, "weight": {"bits": 8}, "activation": {"bits": 8}}
    qmodel = fxquant.prepare_qat(model, {"extends": "lsq_w4a4", "quant": {"rule": [rule]}})
    for record in qmodel.report.layers:
        weight, activations = qmodel.layer_quantizers(record)
        inside = ".self_attn." in record.name
        if inside:
            assert all(q.bits == 8 for q in activations) and (weight is None or weight.bits == 8), record.name
        elif record.role == "":
            assert weight is None or weight.bits == 4, record.name
    assert any(r.name.endswith("fxquant_attention.matmul") for r in qmodel.report.layers)
