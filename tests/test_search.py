"""Bit search: exact allocation (vs brute force), Hutchinson vs the exact Hessian trace, budgets, plans."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fxquant
from fxquant.config.sections import SearchConfig
from fxquant.errors import FxQuantError
from fxquant.search import Option, allocate, apply, hutchinson_traces, layer_table, load_plan, parse_budget, save_plan
from fxquant.search.sensitivity import sam_increases

options = st.lists(st.tuples(st.integers(1, 50), st.floats(0, 100, allow_nan=False)), min_size=1, max_size=4).map(
    lambda pairs: [Option(i, float(c), w) for i, (c, w) in enumerate(pairs)]
)


@given(groups=st.lists(options, min_size=1, max_size=5), slack=st.floats(0.0, 1.0))
def test_allocation_is_exact_and_within_budget(groups, slack):
    cheapest = sum(min(o.cost for o in g) for g in groups)
    dearest = sum(max(o.cost for o in g) for g in groups)
    limit = cheapest + slack * (dearest - cheapest)
    picks, cost, omega = allocate(groups, limit)
    assert cost <= limit + 1e-9
    assert cost == pytest.approx(sum(g[j].cost for g, j in zip(groups, picks)))
    best = min(
        sum(o.omega for o in combo)
        for combo in itertools.product(*groups)
        if sum(o.cost for o in combo) <= limit + 1e-9
    )
    assert omega == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_infeasible_budget_says_so():
    with pytest.raises(FxQuantError, match="below the cheapest"):
        allocate([[Option(2, 5.0, 0.0)], [Option(2, 5.0, 0.0)]], 9.0)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(3, 4)
        self.fc2 = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_hutchinson_matches_the_exact_hessian_trace():
    qmodel = fxquant.prepare_qat(Tiny(), "lsq_w4a4", torch.randn(1, 3))
    x, y = torch.randn(32, 3), torch.randint(0, 3, (32,))
    layers = layer_table(qmodel)
    config = SearchConfig(budget="avg4", tol=1e-9, max_iterations=3000)
    estimate = hutchinson_traces(qmodel, layers, [(x, y)], config, min_iterations=3000)
    model = Tiny()  # the same weights, plain PyTorch
    exact = {}
    for name in ("fc1", "fc2"):
        weight = getattr(model, name).weight

        def loss_of(w, name=name):
            params = {f"{name}.weight": w}
            return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

        hessian = torch.autograd.functional.hessian(loss_of, weight.detach())
        exact[name] = float(hessian.reshape(weight.numel(), weight.numel()).trace())
    for name in exact:
        assert estimate[name] == pytest.approx(exact[name], rel=0.1, abs=1e-3)
    # the activation term: Tr of the loss's Hessian at fc2's input h = tanh(fc1(x)) (all 32×4 elements), and at
    # fc1's input x (a small trace next to the cross terms every probe also carries: a looser match)
    hidden = torch.tanh(model.fc1(x)).detach()
    exact_h = torch.autograd.functional.hessian(lambda h: F.cross_entropy(model.fc2(h), y), hidden).reshape(128, 128)
    exact_x = torch.autograd.functional.hessian(lambda v: F.cross_entropy(model(v), y), x).reshape(96, 96)
    assert estimate[("fc2", 0)] == pytest.approx(float(exact_h.trace()), rel=0.1)
    assert estimate[("fc1", 0)] == pytest.approx(float(exact_x.trace()), rel=0.3)


def test_sam_increase_of_an_activation_is_the_loss_after_its_normalised_gradient_step():
    qmodel = fxquant.prepare_qat(Tiny(), "lsq_w4a4", torch.randn(1, 3))
    x, y = torch.randn(32, 3), torch.randint(0, 3, (32,))
    increases = sam_increases(qmodel, layer_table(qmodel), [(x, y)], SearchConfig(budget="avg4", rho=0.1))
    model = Tiny()
    hidden = torch.tanh(model.fc1(x)).detach().requires_grad_()
    loss = F.cross_entropy(model.fc2(hidden), y)
    (g,) = torch.autograd.grad(loss, hidden)
    moved = F.cross_entropy(model.fc2(hidden.detach() + 0.1 * g / g.norm()), y)
    assert increases[("fc2", 0)] == pytest.approx(float((moved - loss).detach()), rel=1e-4, abs=1e-7)


def test_budgets():
    qmodel = fxquant.prepare_qat(Tiny(), "lsq_w4a4", torch.randn(1, 3))
    layers = layer_table(qmodel)
    macs = sum(layer.macs for layer in layers)
    assert macs == 3 * 4 + 4 * 3
    assert parse_budget("0.25xW8A8", layers).limit == pytest.approx(0.25 * 64 * macs)
    assert parse_budget("1xFP32", layers).limit == pytest.approx(1024 * macs)
    # both layers of this model are first/last (fixed at 8 bits): the uniform-3-bit recipe costs 64·MACs
    assert parse_budget("avg3", layers).limit == pytest.approx(64 * macs)
    assert parse_budget("size:2kB", layers).limit == 2000 and parse_budget("size:2kB", layers).kind == "size"
    assert parse_budget("1e6", layers).limit == 1e6
    with pytest.raises(FxQuantError, match="not understood"):
        parse_budget("a quarter", layers)


def test_search_respects_budget_and_fixed_layers_and_plans_round_trip(tmp_path):
    torch.manual_seed(0)
    qmodel = fxquant.prepare_qat(fxquant.models.resnet20(), "lsq_w4a4", torch.randn(1, 1, 28, 28))
    batches = [(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))]
    plan, layers = fxquant.search.search(qmodel, batches, {"budget": "avg3", "method": "sam"})
    budget = parse_budget("avg3", layers)
    assert fxquant.search.total_cost(layers, plan, budget) <= budget.limit
    assert plan["conv1"] == (8, 8) and plan["fc"] == (8, 8)  # the recipe's first/last widths
    path = save_plan(plan, tmp_path / "plan.toml", comment="test")
    assert load_plan(path) == plan
    apply(qmodel, plan)
    weight_q, _ = qmodel.layer_quantizers(next(r for r in qmodel.report.layers if r.name == "layer2.0.conv1"))
    assert weight_q.bits == plan["layer2.0.conv1"][0]
    with pytest.raises(FxQuantError, match=r"layer1\.0\.conv9.*did you mean 'layer1\.0\.conv[12]'"):
        apply(qmodel, {"layer1.0.conv9": (2, 2)})
    # a recipe can include the plan
    recipe = tmp_path / "mixed.toml"
    recipe.write_text(f'extends = "lsq_w4a4"\n[bits]\nplan = "{path.name}"\n')
    planned = fxquant.prepare_qat(fxquant.models.resnet20(), str(recipe))
    weight_q, _ = planned.layer_quantizers(next(r for r in planned.report.layers if r.name == "layer2.0.conv1"))
    assert weight_q.bits == plan["layer2.0.conv1"][0]


def test_fit_runs_a_recipe_search_before_training():
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 1, 28, 28), torch.arange(64) % 10)
    recipe = {"extends": "saq_w4a4", "search": {"method": "sam", "budget": "avg3", "batches": 1}}
    qmodel = fxquant.prepare_qat(fxquant.models.resnet20(), recipe)
    fxquant.fit(qmodel, data, None, {"epochs": 1, "batch_size": 16}, progress=False)
    plan = qmodel.bit_plan
    assert set(plan.values()) <= {(2, 2), (3, 3), (4, 4), (8, 8)} and plan["conv1"] == (8, 8)
    assert fxquant.load_recipe("mixed_hessian").search.method == "hessian"


def test_controller_learns_to_prefer_cheap_choices():
    """REINFORCE alone: with reward = −(number of non-zero choices), the first choice's probability grows."""
    from fxquant.search.saq_generator import Controller

    torch.manual_seed(0)
    controller = Controller(layers=3, choices=3)
    optimizer = torch.optim.Adam(controller.parameters(), lr=0.05)
    baseline = None
    for _ in range(150):
        actions, log_prob, _ = controller.sample()
        reward = -float(sum(a != 0 for a in actions))
        baseline = reward if baseline is None else 0.9 * baseline + 0.1 * reward
        optimizer.zero_grad()
        (-(reward - baseline) * log_prob).backward()
        optimizer.step()
    assert controller.sample(greedy=True)[0] == [0, 0, 0]


def test_saq_generator_returns_a_plan_inside_the_budget_and_restores_the_weights():
    torch.manual_seed(0)
    qmodel = fxquant.prepare_qat(fxquant.models.resnet20(), "lsq_w4a4", torch.randn(1, 1, 28, 28))
    batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(3)]
    fxquant.calibrate(qmodel, batches[0][0])
    before = {k: v.clone() for k, v in qmodel.state_dict().items() if "quantizer" not in k}
    config = {"budget": "avg4", "method": "saq", "iterations": 4, "budget_slack": 0.3}
    plan, layers = fxquant.search.search(qmodel, batches, config, warmup_batches=batches[:2])
    budget = parse_budget("avg4", layers)
    assert 0.7 * budget.limit <= fxquant.search.total_cost(layers, plan, budget) <= budget.limit
    assert plan["conv1"] == (8, 8)
    assert all(q.width_steps is None for q in qmodel.quantizers().values() if hasattr(q, "width_steps"))
    after = qmodel.state_dict()
    for key, value in before.items():  # the supernet's training (weights, BN statistics) is undone
        assert torch.equal(after[key], value), key


def test_saq_search_defaults_follow_the_authors():
    config = fxquant.load_recipe("mixed_saq").search
    assert config.widths == (2, 3, 4, 5) and config.warmup_iterations > 0 and not config.search_first_last
    assert fxquant.load_recipe("mixed_hessian").search.widths == (2, 3, 4, 8)


def test_layers_reading_one_activation_quantizer_share_a_width_so_real_bops_fit():
    from fxquant.search import shared_input_groups
    from fxquant.summary import collect

    torch.manual_seed(0)
    qmodel = fxquant.prepare_qat(fxquant.models.resnet20(), "lsq_w4a4", torch.randn(1, 1, 28, 28))
    groups = shared_input_groups(qmodel)
    assert ["layer2.0.conv1", "layer2.0.downsample.0"] in [sorted(g) for g in groups]
    batches = [(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))]
    plan, layers = fxquant.search.search(qmodel, batches, {"budget": "avg3", "method": "sam"})
    apply(qmodel, plan)
    _, totals = collect(qmodel)
    assert totals["bops"] <= parse_budget("avg3", layers).limit * (1 + 1e-9)


def test_searching_first_and_last_layers_widens_the_choice_under_the_same_budget():
    """At avg2 with fixed first/last layers the only plan is uniform 2 bits; searching them too keeps the same
    budget (they are still counted at 8 bits) and can only lower the allocation's objective."""
    torch.manual_seed(0)
    qmodel = fxquant.prepare_qat(fxquant.models.resnet20(), "lsq_w2a2", torch.randn(1, 1, 28, 28))
    batches = [(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))]
    fixed_plan, _ = fxquant.search.search(qmodel, batches, {"budget": "avg2", "method": "sam"})
    assert {bits for name, bits in fixed_plan.items() if name not in ("conv1", "fc")} == {(2, 2)}
    config = {"budget": "avg2", "method": "sam", "search_first_last": True}
    free_plan, layers = fxquant.search.search(qmodel, batches, config)
    budget = parse_budget("avg2", layers)
    assert budget.limit == parse_budget("avg2", layer_table(qmodel)).limit  # same budget either way
    assert fxquant.search.total_cost(layers, free_plan, budget) <= budget.limit
    assert all(len(layer.omega) == 4 for layer in layers)  # every layer, first/last included, had every width

    def objective(plan):
        return sum(layer.omega[plan[layer.name][0]] for layer in layers)

    assert objective(free_plan) <= objective(fixed_plan) + 1e-12


def test_search_functions_take_the_recipe_section_and_repeat_none_of_its_defaults():
    """Every default of a [search] key is written once, in SearchConfig: no search function re-declares one."""
    import inspect

    from fxquant.config.fields import toml_fields

    keys = {f.name for f in toml_fields(SearchConfig)}
    for function in (fxquant.search.search, fxquant.search.generate, hutchinson_traces, sam_increases):
        # (their ``batches`` is the data itself; the section's ``batches`` is how many to take)
        mirrored = sorted(keys & set(inspect.signature(function).parameters) - {"batches"})
        assert not mirrored, f"{function.__name__} re-declares [search] keys {mirrored}: take the SearchConfig"
    assert SearchConfig(budget="avg3").widths == (2, 3, 4, 8)
    assert SearchConfig(budget="avg3", method="saq").widths == (2, 3, 4, 5)
