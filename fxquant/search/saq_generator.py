"""SAQ's configuration generator: an LSTM controller that learns per-layer bit widths on a weight-sharing
supernet, trained by REINFORCE on a sharpness-aware cost (Liu, Cai, Zhuang, SAQ v1).

Each iteration: the controller samples one width per searchable layer (weights and activations tied); the
supernet — the prepared model with a separate learned step per width in every quantizer — takes one SAM step
at that configuration on a training batch; the configuration's cost on a held-out batch is the SAM loss (the
loss at the perturbed quantized weights) plus λ·(BOPs/target − 1)²; the controller follows REINFORCE with a
moving-average baseline and an entropy bonus. At the end, configurations are sampled, those within
[target·(1 − slack), target] kept, and the one with the least sharpness (perturbed loss − clean loss, held
out, eval mode) wins.

As the authors' code does (zhuang-group/SAQ): the supernet is first warmed up on shuffled training batches with
uniformly sampled configurations before the controller learns; held-out losses are measured in eval mode; the
first/last layers keep their widths; candidates default to {2, 3, 4, 5} (``SearchConfig.widths``). The search
trains the model's weights as the supernet, so every weight and buffer is restored afterwards (``restore=True``):
fine-tuning then starts from the same FP checkpoint as a uniform recipe's, and the only thing the search leaves is
the plan.

Example usage::

    plan, info = fxquant.search.saq_generator.generate(qmodel, train_batches, held_out, SearchConfig(budget="avg3"))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.config.sections import SAMConfig, SearchConfig
from fxquant.errors import FxQuantError
from fxquant.quant.controls import clamp_steps
from fxquant.quant.quantizers import FakeQuantizer, LSQQuantizer
from fxquant.train.sam import SAM

from .budget import layer_table, parse_budget, tie_groups, total_cost
from .plan import apply


class Controller(nn.Module):
    """An LSTM emitting one categorical choice per layer; the previous choice is the next step's input.

    Example usage::

        controller = Controller(layers=19, choices=4)
        actions, log_prob, entropy = controller.sample()
    """

    def __init__(self, layers: int, choices: int, hidden: int = 64):
        super().__init__()
        self.layers = layers
        self.embed = nn.Embedding(choices + 1, hidden)  # index `choices` is the start token
        self.cell = nn.LSTMCell(hidden, hidden)
        self.head = nn.Linear(hidden, choices)
        self.start = choices
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)  # uniform choices at the start

    def sample(self, greedy: bool = False, generator: torch.Generator | None = None):
        device = self.head.weight.device
        h = c = torch.zeros(1, self.cell.hidden_size, device=device)
        token = torch.tensor([self.start], device=device)
        actions, log_probs, entropies = [], [], []
        for _ in range(self.layers):
            h, c = self.cell(self.embed(token), (h, c))
            logits = self.head(h)[0]
            probs = F.softmax(logits, dim=0)
            action = int(probs.argmax()) if greedy else int(torch.multinomial(probs, 1, generator=generator))
            log_probs.append(F.log_softmax(logits, dim=0)[action])
            entropies.append(-(probs * F.log_softmax(logits, dim=0)).sum())
            actions.append(action)
            token = torch.tensor([action], device=device)
        return actions, torch.stack(log_probs).sum(), torch.stack(entropies).sum()


@dataclass
class GeneratorResult:
    plan: dict[str, tuple[int, int]]
    bops: float
    target: float
    sharpness: float
    history: list[dict[str, float]] = field(default_factory=list)


def _sam_losses(model: nn.Module, sam: SAM, batch) -> tuple[float, float]:
    """(clean loss, loss at the SAM-perturbed quantized weights) on one batch; leaves no gradients."""
    x, y = batch
    terms = sam.step(lambda: {"ce": F.cross_entropy(model(x), y)})
    for p in model.parameters():
        p.grad = None
    return float(terms["ce"].detach()), float(sam.last_perturbed_loss)


def generate(
    qmodel: nn.Module,
    train_batches: Sequence,
    held_out: Sequence,
    config: SearchConfig,
    *,
    example_inputs=None,
    seed: int = 0,
    progress: bool = False,
    warmup_batches: Sequence = (),
    restore: bool = True,
    penalty: float = 5.0,
    lr: float = 0.01,
    controller_lr: float = 5e-3,
    entropy_weight: float = 1e-3,
    final_samples: int = 32,
) -> tuple[dict[str, tuple[int, int]], GeneratorResult]:
    """Learn a bit configuration as SAQ's generator does (see the module docstring); returns (plan, result).

    ``config`` is the ``[search]`` section: its budget, candidate widths, ``iterations``, SAM radius ``rho``,
    ``search_first_last`` and ``budget_slack``. The generator's own hyperparameters (the budget ``penalty`` λ,
    the supernet's and the controller's learning rates, the entropy bonus, the final samples) are not recipe keys.
    ``qmodel``'s quantizers must be initialised (one forward); its weights are trained as the supernet and, with
    ``restore``, put back afterwards (weights and BN statistics; each quantizer keeps the step learned for its
    chosen width); its step sharing ends at the chosen widths.
    ``warmup_batches`` train the supernet under random configurations before the controller learns. First/last
    layers keep the recipe's widths unless ``search_first_last`` (the budget still counts them at those widths).
    """
    budget, candidates, iterations = config.budget, config.widths, config.iterations
    search_first_last, budget_slack = config.search_first_last, config.budget_slack
    # the weights and buffers (BN statistics) of every layer; a quantizer keeps the step learned for its width
    in_quantizers = {id(t) for q in qmodel.modules() if isinstance(q, FakeQuantizer) for t in q.state_dict().values()}
    tensors = [t for t in [*qmodel.parameters(), *qmodel.buffers()] if id(t) not in in_quantizers]
    saved = [(t, t.detach().clone()) for t in tensors] if restore else []
    layers = layer_table(qmodel, example_inputs)
    target = parse_budget(budget, layers)
    # one choice per group of layers that must share a width (they read one activation quantizer)
    groups = tie_groups(qmodel, layers)
    fixed_widths = {layer.name: layer.fixed_bits for layer in layers if layer.fixed_bits and not search_first_last}
    searchable = [g for g in groups if not any(layer.name in fixed_widths for layer in g)]
    pinned = [g for g in groups if any(layer.name in fixed_widths for layer in g)]
    if not searchable:
        raise FxQuantError("no layer to search: every quantized layer has a fixed width")
    quantizers = [m for m in qmodel.modules() if isinstance(m, LSQQuantizer)]
    if any(not q.is_initialized for q in quantizers):
        raise FxQuantError("initialise the quantizers first (one forward on a batch)")
    for q in quantizers:
        q.share_steps_across(sorted(set(candidates) | {q.bits}))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.device("cpu"):  # the controller is a small host-side LSTM, whatever the default device
        controller = Controller(len(searchable), len(candidates))
    controller_opt = torch.optim.Adam(controller.parameters(), lr=controller_lr)
    supernet_opt = torch.optim.SGD([p for p in qmodel.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    sam = SAM(qmodel, SAMConfig(rho=config.rho))
    fixed = {}
    for g in pinned:  # a group holding a first/last layer takes that layer's width
        width = max(fixed_widths[layer.name] for layer in g if layer.name in fixed_widths)
        fixed.update({layer.name: (width, width) for layer in g})
    result = GeneratorResult({}, 0.0, target.limit, math.inf)
    baseline = None

    def plan_of(actions: list[int]) -> dict[str, tuple[int, int]]:
        chosen = {layer.name: (candidates[a], candidates[a]) for g, a in zip(searchable, actions) for layer in g}
        return {**fixed, **chosen}

    try:
        qmodel.train()
        for x, y in warmup_batches:  # the supernet learns every width before the controller judges them
            drawn = torch.randint(len(candidates), (len(searchable),), generator=generator, device="cpu")
            actions = [int(a) for a in drawn]
            apply(qmodel, plan_of(actions))
            sam.step(lambda x=x, y=y: {"ce": F.cross_entropy(qmodel(x), y)})
            supernet_opt.step()
            clamp_steps(qmodel)
        for it in range(iterations):
            actions, log_prob, entropy = controller.sample(generator=generator)
            plan = plan_of(actions)
            apply(qmodel, plan)
            x, y = train_batches[it % len(train_batches)]
            sam.step(lambda x=x, y=y: {"ce": F.cross_entropy(qmodel(x), y)})
            supernet_opt.step()
            clamp_steps(qmodel)
            qmodel.eval()  # held-out losses with the running statistics, as the final scoring measures them
            _, perturbed = _sam_losses(qmodel, sam, held_out[it % len(held_out)])
            qmodel.train()
            ratio = total_cost(layers, plan, target) / target.limit
            cost = perturbed + penalty * (ratio - 1.0) ** 2
            reward = -cost
            baseline = reward if baseline is None else 0.9 * baseline + 0.1 * reward
            controller_loss = -(reward - baseline) * log_prob - entropy_weight * entropy
            controller_opt.zero_grad()
            controller_loss.backward()
            with torch.device("cpu"):  # Adam's step counters next to the controller's parameters
                controller_opt.step()
            result.history.append({"cost": cost, "sam_loss": perturbed, "bops_ratio": ratio})
        # final choice: sampled configurations inside the budget, least sharpness on held-out data
        qmodel.eval()
        best = None
        with torch.no_grad():
            draws = [controller.sample(greedy=True)[0]] + [
                controller.sample(generator=generator)[0] for _ in range(final_samples - 1)
            ]
        seen = set()
        floor = target.limit * (1 - budget_slack)
        for actions in draws:
            plan = plan_of(actions)
            key = tuple(actions)
            cost = total_cost(layers, plan, target)
            if key in seen or not floor <= cost <= target.limit:  # far below the target is another budget
                continue
            seen.add(key)
            apply(qmodel, plan)
            sharpness = 0.0
            for batch in held_out:
                clean, perturbed = _sam_losses(qmodel, sam, batch)
                sharpness += (perturbed - clean) / len(held_out)
            if best is None or sharpness < best[0]:
                best = (sharpness, plan)
        if best is None:
            cheapest = {**fixed, **{layer.name: (min(candidates),) * 2 for g in searchable for layer in g}}
            raise FxQuantError(
                f"no sampled configuration costs between {1 - budget_slack:.2f}× and 1× the budget {budget} (the "
                f"cheapest uses {total_cost(layers, cheapest, target) / target.limit:.2f}× of it); raise the penalty, "
                "the iterations or the slack"
            )
        result.sharpness, result.plan = best
        result.bops = total_cost(layers, result.plan, target)
    finally:
        sam.remove()
        qmodel.train()
    apply(qmodel, result.plan)
    for q in quantizers:
        q.keep_current_width()
    with torch.no_grad():
        for tensor, value in saved:  # the supernet's training is not fine-tuning's starting point
            if tensor.shape == value.shape:
                tensor.copy_(value)
    for layer in layers:
        layer.bits = result.plan[layer.name][0]
    return result.plan, result
