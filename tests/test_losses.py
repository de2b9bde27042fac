"""Auxiliary losses against independent formulas, the recipe wiring, and what the training step runs."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxquant
from fxquant.config.sections import MECConfig
from fxquant.errors import RecipeError
from fxquant.models import resnet20
from fxquant.quant.quantizers import LSQQuantizer
from fxquant.quant.spec import QuantizerConfig
from fxquant.quant.taps import FeaturePerturbation
from fxquant.train.losses import (
    channel_standardize,
    csd_loss,
    dkd_terms,
    kd_loss,
    mec_loss,
    mec_moe_loss,
    sigmoid_rampup,
)
from fxquant.train.losses.mec import ExpertGate, MECLoss, importance_balance, standardize

seeds = st.integers(0, 10_000)


def _kl_rows(p, q):
    return [sum(pi * math.log(pi / qi) for pi, qi in zip(pr, qr) if pi > 0) for pr, qr in zip(p.tolist(), q.tolist())]


@given(seed=seeds, T=st.floats(0.5, 8.0))
def test_kd_is_the_softened_kl(seed, T):
    torch.manual_seed(seed)
    s, t = torch.randn(5, 7), torch.randn(5, 7) * 3
    expected = sum(_kl_rows(torch.softmax(t / T, 1), torch.softmax(s / T, 1))) / 5 * T * T
    assert float(kd_loss(s, t, T)) == pytest.approx(expected, rel=1e-4, abs=1e-6)


@given(seed=seeds, T=st.floats(1.0, 6.0))
def test_dkd_decomposes_kd(seed, T):
    """Zhao et al.'s identity, sample by sample: KD = TCKD + (1 − p_t(gt))·NCKD."""
    torch.manual_seed(seed)
    s, t = torch.randn(1, 6) * 2, torch.randn(1, 6) * 2
    y = torch.randint(0, 6, (1,))
    tckd, nckd = dkd_terms(s, t, y, T)
    p_gt = float(torch.softmax(t / T, 1)[0, y])
    assert float(kd_loss(s, t, T)) == pytest.approx(float(tckd) + (1 - p_gt) * float(nckd), rel=1e-3, abs=1e-5)


def test_dkd_terms_against_a_written_out_formula():
    torch.manual_seed(0)
    s, t, y, T = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 3, 1, 4]), 2.0
    tckd, nckd = dkd_terms(s, t, y, T)
    ps, pt = torch.softmax(s / T, 1), torch.softmax(t / T, 1)
    tc, nc = 0.0, 0.0
    for i in range(4):
        g = int(y[i])
        bs, bt = [float(ps[i, g]), 1 - float(ps[i, g])], [float(pt[i, g]), 1 - float(pt[i, g])]
        tc += sum(b * math.log(b / a) for a, b in zip(bs, bt))
        others = [j for j in range(5) if j != g]
        qs = torch.softmax(s[i, others] / T, 0)
        qt = torch.softmax(t[i, others] / T, 0)
        nc += sum(_kl_rows(qt[None], qs[None]))
    assert float(tckd) == pytest.approx(tc / 4 * T * T, rel=1e-4)
    assert float(nckd) == pytest.approx(nc / 4 * T * T, rel=1e-4)


def test_csd_against_a_per_channel_loop():
    torch.manual_seed(0)
    zs, zt = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5) * 2 + 1
    total = 0.0
    for c in range(4):
        a, b = zs[:, c].flatten(), zt[:, c].flatten()
        a = (a - a.mean()) / torch.sqrt(a.var(unbiased=False) + 1e-5)
        b = (b - b.mean()) / torch.sqrt(b.var(unbiased=False) + 1e-5)
        total += float(((b - a) ** 2).sum())
    assert float(csd_loss({"l": zs}, {"l": zt}, "sum")) == pytest.approx(total, rel=1e-5)
    assert float(csd_loss({"l": zs}, {"l": zt}, "batch")) == pytest.approx(total / 3, rel=1e-5)
    assert float(csd_loss({"l": zs}, {"l": zt}, "mean")) == pytest.approx(total / zs.numel(), rel=1e-5)
    standardized = channel_standardize(zt)
    torch.testing.assert_close(standardized.mean((0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)


@given(seed=seeds, m=st.integers(4, 24), d=st.integers(4, 24))
def test_mec_series_converges_to_the_log_det(seed, m, d):
    """With one view twice, I + λZZᵀ is positive definite; a long series equals −μ·log det(I + λZZᵀ)/m."""
    torch.manual_seed(seed)
    z = torch.randn(m, d, dtype=torch.float64)
    zn = torch.nn.functional.normalize(z, dim=1)
    # choose ε² so that the spectral radius of λZZᵀ is 1/2: the series then converges fast
    lam = 0.5 / float(torch.linalg.eigvalsh(zn @ zn.T).max())
    eps2 = d / (m * lam)
    exact = -(m + d) / 2 * torch.logdet(torch.eye(m, dtype=torch.float64) + lam * zn @ zn.T) / m
    value = mec_loss(z, z, eps2, order=60, scale="mu", standardized=False)
    assert float(value) == pytest.approx(float(exact), rel=1e-6, abs=1e-9)
    # the reference's scaling: the same series times λ⁻¹ instead of μ
    scaled = mec_loss(z, z, eps2, order=60, scale="lambda_inv", standardized=False)
    assert float(scaled) == pytest.approx(float(exact) / ((m + d) / 2) / lam, rel=1e-6, abs=1e-9)


@given(seed=seeds, m=st.integers(4, 24), d=st.integers(2, 24))
def test_mec_first_order_term_is_minus_the_mean_cosine_of_standardised_features(seed, m, d):
    """As the reference scales it, MEC's first-order term is −mean cos(z₁ᵢ, z₂ᵢ), features centred and scaled
    per dimension over the batch exactly as BatchNorm1d(affine=False) in training mode does."""
    torch.manual_seed(seed)
    z1, z2 = torch.randn(m, d, dtype=torch.float64) + 3, torch.randn(m, d, dtype=torch.float64) + 3
    bn = torch.nn.BatchNorm1d(d, affine=False, eps=1e-5).double().train()
    torch.testing.assert_close(standardize(z1), bn(z1))
    a, b = torch.nn.functional.normalize(bn(z1), dim=1), torch.nn.functional.normalize(bn(z2), dim=1)
    expected = -(a * b).sum(1).mean()
    assert float(mec_loss(z1, z2, order=1)) == pytest.approx(float(expected), rel=1e-9, abs=1e-12)


def test_mec_reports_its_gradient_against_the_cross_entropys():
    """``mec.grad_ratio``: the MEC term's gradient norm at the tapped features over the cross-entropy's; it
    scales with the loss weight (so it measures the term, not noise)."""
    torch.manual_seed(0)
    base = resnet20()
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    ratios = {}
    for weight in (0.5, 1.0):
        qmodel = fxquant.prepare_qat(base, "mec_w4a4", loss=[{"kind": "mec", "tap": "features", "weight": weight}])
        step = fxquant.TrainStep(qmodel, torch.optim.SGD(qmodel.parameters(), lr=0.0))
        torch.manual_seed(1)  # the same strong view for both
        ratios[weight] = float(step(x, y)["mec.grad_ratio"])
    assert math.isfinite(ratios[0.5]) and ratios[0.5] > 0
    assert ratios[1.0] == pytest.approx(2 * ratios[0.5], rel=1e-4)


def test_mec_uses_the_smaller_product_and_experts_reduce_to_mec():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 40, dtype=torch.float64), torch.randn(6, 40, dtype=torch.float64)
    # tr((Z1 Z2ᵀ)^k) computed on the 6×6 side equals the 40×40 side
    a = torch.nn.functional.normalize(z1, dim=1)
    b = torch.nn.functional.normalize(z2, dim=1)
    for k in (1, 2, 3):
        small = torch.linalg.matrix_power(a @ b.T, k).trace()
        large = torch.linalg.matrix_power(b.T @ a, k).trace()
        assert float(small) == pytest.approx(float(large), rel=1e-9)
    assert float(mec_moe_loss(z1, z2, experts=1)) == pytest.approx(float(mec_loss(z1, z2)), rel=1e-12)
    halves = (mec_loss(z1[:, :20], z2[:, :20]) + mec_loss(z1[:, 20:], z2[:, 20:])) / 2
    assert float(mec_moe_loss(z1, z2, experts=2)) == pytest.approx(float(halves), rel=1e-12)


@given(seed=seeds, m=st.integers(4, 16), experts=st.integers(2, 4))
def test_gated_mec_first_order_term_is_minus_the_gate_weighted_cosine(seed, m, experts):
    """With a gate g (m, E), expert e weights sample i by √(E·g_ie) on both views, so the first-order term is
    −Σ_e Σ_i g_ie·cos(z₁ᵢᵉ, z₂ᵢᵉ)/m; the equal gate g = 1/E gives back the ungated mixture."""
    torch.manual_seed(seed)
    z1, z2 = torch.randn(m, 4 * experts, dtype=torch.float64), torch.randn(m, 4 * experts, dtype=torch.float64)
    gates = torch.softmax(torch.randn(m, experts, dtype=torch.float64), 1)
    expected = 0.0
    for e, (a, b) in enumerate(zip(z1.tensor_split(experts, 1), z2.tensor_split(experts, 1))):
        a, b = (
            torch.nn.functional.normalize(standardize(a), dim=1),
            torch.nn.functional.normalize(standardize(b), dim=1),
        )
        expected -= float((gates[:, e] * (a * b).sum(1)).sum()) / m
    value = mec_moe_loss(z1, z2, experts, gates, order=1)
    assert float(value) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    equal = torch.full((m, experts), 1.0 / experts, dtype=torch.float64)
    assert float(mec_moe_loss(z1, z2, experts, equal)) == pytest.approx(float(mec_moe_loss(z1, z2, experts)), rel=1e-9)


@given(seed=seeds, m=st.integers(2, 12), experts=st.integers(2, 6))
def test_importance_balance_is_the_squared_coefficient_of_variation(seed, m, experts):
    torch.manual_seed(seed)
    gates = torch.softmax(3 * torch.randn(m, experts, dtype=torch.float64), 1)
    importance = [sum(row[e] for row in gates.tolist()) for e in range(experts)]
    mean = sum(importance) / experts
    expected = sum((v - mean) ** 2 for v in importance) / experts / mean**2
    assert float(importance_balance(gates)) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert float(importance_balance(torch.full((m, experts), 1.0 / experts))) == pytest.approx(0.0, abs=1e-12)


def test_the_balancing_term_keeps_a_learned_gate_from_collapsing():
    """Expert 0's channels agree across the two views, so it codes most cheaply: the coding length alone
    routes every sample there; the balancing term keeps the experts' loads near equal."""
    torch.manual_seed(0)
    shared = torch.randn(64, 8)
    z1 = torch.cat([shared, torch.randn(64, 24)], 1)
    z2 = torch.cat([shared + 0.05 * torch.randn(64, 8), torch.randn(64, 24)], 1)
    shares = {}
    for balance in (0.0, MECConfig().balance):
        gate = ExpertGate(4)
        optimizer = torch.optim.Adam(gate.parameters(), lr=0.05)
        for _ in range(150):
            g = gate(standardize(z1), standardize(z2))
            loss = mec_moe_loss(z1, z2, 4, g) + balance * importance_balance(g)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        importance = gate(standardize(z1), standardize(z2)).detach().sum(0)
        shares[balance] = float(importance.max() / importance.sum())
    assert shares[0.0] > 0.6  # collapsing onto the cheap expert
    assert shares[MECConfig().balance] < 0.35  # near 1/4


def test_train_step_trains_a_learned_gate_and_reports_its_balance():
    torch.manual_seed(0)
    loss = [{"kind": "mec", "tap": "features", "experts": 4, "gate": "learned", "weight": 1.0}]
    qmodel = fxquant.prepare_qat(resnet20(), "mec_w4a4", loss=loss)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.1)
    step = fxquant.TrainStep(qmodel, optimizer)
    (mec,) = step.losses
    assert isinstance(mec, MECLoss) and mec.gate is not None
    assert optimizer.param_groups[-1]["name"] == "losses"
    assert {id(p) for p in optimizer.param_groups[-1]["params"]} == {id(p) for p in mec.gate.parameters()}
    before = [p.detach().clone() for p in mec.gate.parameters()]
    metrics = step(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    assert "mec.balance" in metrics and 0.25 <= metrics["mec.gate_max_share"] <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, mec.gate.parameters()))
    fxquant.TrainStep(qmodel, optimizer, losses=step.losses)  # the same losses again: not added twice
    assert sum(1 for g in optimizer.param_groups if g.get("name") == "losses") == 1


def test_a_learned_gate_needs_two_experts():
    with pytest.raises(RecipeError, match=r"loss\[0\]: gate = \"learned\" routes between experts"):
        fxquant.load_recipe({"extends": "mec_w2a2", "loss": [{"kind": "mec", "tap": "features", "gate": "learned"}]})


def test_sigmoid_rampup_endpoints():
    assert sigmoid_rampup(0.0, 2.0) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(2.0, 2.0) == 1.0 and sigmoid_rampup(5.0, 0.0) == 1.0


def test_perturbation_is_bounded_and_applied_at_rate_p():
    torch.manual_seed(0)
    q = LSQQuantizer(QuantizerConfig(bits=4), signed=True)
    q(torch.randn(2, 3, 4, 4))
    step = float(q.scale.detach())
    perturb = FeaturePerturbation(0.3, q).train()
    x = torch.zeros(2, 3, 4, 4)
    changed = 0
    for _ in range(2000):
        delta = perturb(x) - x
        assert float(delta.abs().max()) <= step / 2 + 1e-7
        changed += bool(delta.abs().sum() > 0)
    assert perturb.calls == 2000 and changed == perturb.applied
    assert 0.3 - 0.04 < perturb.applied / 2000 < 0.3 + 0.04
    perturb.eval()
    assert torch.equal(perturb(x), x)


def test_taps_give_features_by_name():
    qmodel = fxquant.prepare_qat(
        resnet20(),
        {"extends": "lsq_w4a4", "taps": {"feat": "penultimate", "convs": "type:Conv2d", "l3": "module:layer3"}},
    )
    qmodel(torch.randn(4, 1, 28, 28))
    assert qmodel.taps["feat"].shape == (4, 64)
    assert len(qmodel.taps["convs"]) == 21 and "layer2.0.downsample.0" in qmodel.taps["convs"]
    assert qmodel.taps["l3"].shape == (4, 64, 7, 7)


def test_bad_feature_recipes_fail_at_prepare_time():
    with pytest.raises(RecipeError, match=r"loss\[0\]\.tap.*did you mean 'feat'"):
        fxquant.prepare_qat(
            resnet20(),
            {"extends": "lsq_w4a4", "taps": {"feat": "penultimate"}, "loss": [{"kind": "mec", "tap": "feet"}]},
        )
    with pytest.raises(RecipeError, match=r"taps\.x.*matches nothing"):
        fxquant.prepare_qat(resnet20(), {"extends": "lsq_w4a4", "taps": {"x": "module:layer9"}})
    qmodel = fxquant.prepare_qat(resnet20(), "fpq_w4a4", float_model=False)
    with pytest.raises(fxquant.FxQuantError, match=r"fpq distil from the float model.*TrainStep\(\.\.\., teacher="):
        fxquant.TrainStep(qmodel, torch.optim.SGD(qmodel.parameters(), lr=0.1))


@pytest.mark.parametrize(
    "recipe",
    ["cr_w4a4", "cr_w2a2", "fpq_w4a4", "fpq_w2a4", "fpq_w2a2", "mec_w4a4", "mec_w2a2", "fpq_cr_w2a2", "fpq_cr_w4a4"],
)
def test_recipes_train_and_gradients_reach_only_the_student(recipe):
    torch.manual_seed(0)
    qmodel = fxquant.prepare_qat(resnet20(), recipe)
    step = fxquant.TrainStep(qmodel, fxquant.train.make_optimizer(qmodel, qmodel.recipe.train))
    teacher_before = [p.clone() for p in step.teacher.parameters()] if step.teacher is not None else []
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(2):
        metrics = step(x, y)
    kinds = {loss.kind for loss in step.losses}
    assert all(math.isfinite(v) for v in metrics.values())
    assert any(name.startswith(tuple(kinds)) for name in metrics)
    if step.teacher is not None:
        assert all(p.grad is None for p in step.teacher.parameters())
        assert all(torch.equal(a, b) for a, b in zip(teacher_before, step.teacher.parameters()))
    for loss in step.losses:
        ema = getattr(loss, "ema", None)
        if ema is not None:
            assert all(p.grad is None and not p.requires_grad for p in ema.parameters())
    assert not qmodel.taps, "the store is cleared after the step"


def test_a_float_teacher_given_to_the_step_records_the_students_taps():
    """TrainStep(qmodel, optimizer, teacher=float_model) on an FPQ recipe: the plain float model has no taps, so
    the step teaches with the student's structure and the float weights (and refuses another architecture)."""
    torch.manual_seed(0)
    fp = resnet20()
    qmodel = fxquant.prepare_qat(resnet20(), "fpq_w4a4", float_model=False)
    step = fxquant.TrainStep(qmodel, torch.optim.SGD(qmodel.parameters(), lr=0.01), teacher=fp)
    metrics = step(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)))
    assert math.isfinite(metrics["fpq.csd"])
    fp.eval()
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(step.teacher(x), fp(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(fxquant.FxQuantError, match="compare the teacher's features layer by layer"):
        fxquant.TrainStep(
            qmodel, torch.optim.SGD(qmodel.parameters(), lr=0.01), teacher=fxquant.models.mobilenet_v2_small()
        )


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_teacher_warms_up_to_the_mean_of_the_iterates(warmup):
    """With warm-up, the EMA after t steps (t < 1/(1 − decay)) is the plain mean of the initial weights and the
    t iterates; without it, the textbook recursion w_ema ← d·w_ema + (1 − d)·w."""
    from fxquant.config import ConsistencyConfig
    from fxquant.train.losses.consistency import ConsistencyLoss

    torch.manual_seed(0)
    student = torch.nn.Linear(3, 2)
    loss = ConsistencyLoss(ConsistencyConfig(teacher="ema", ema_decay=0.99, ema_warmup=warmup))
    loss.teacher_model(student, None)
    iterates = [student.weight.detach().clone()]
    expected = iterates[0].clone()
    for _ in range(5):
        with torch.no_grad():
            student.weight.add_(torch.randn_like(student.weight))
        iterates.append(student.weight.detach().clone())
        expected = 0.99 * expected + 0.01 * iterates[-1]
        loss.after_step(student)
    reference = torch.stack(iterates).mean(0) if warmup else expected
    torch.testing.assert_close(loss.ema.weight, reference)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_ema_teacher_keeps_its_own_bn_statistics_in_train_mode(mode):
    """Mean Teacher: the EMA model runs in train mode, its BN layers normalise with its own batch statistics and
    keep their own running averages; ``ema_mode = "eval"`` runs it in eval mode with the student's copied."""
    torch.manual_seed(0)
    recipe = {"extends": "cr_w4a4", "loss": [{"kind": "consistency", "teacher": "ema", "ema_mode": mode}]}
    qmodel = fxquant.prepare_qat(resnet20(), recipe, torch.randn(2, 1, 28, 28))
    step = fxquant.TrainStep(qmodel, torch.optim.SGD(qmodel.parameters(), lr=0.01))
    for _ in range(2):
        metrics = step(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    (loss,) = step.losses
    assert loss.ema.training is (mode == "train")
    student_mean = dict(qmodel.named_buffers())["model.bn1.running_mean"]
    teacher_mean = dict(loss.ema.named_buffers())["model.bn1.running_mean"]
    assert torch.equal(student_mean, teacher_mean) is (mode == "eval")
    assert 0 <= metrics["consistency.teacher_acc"] <= 1 and 0 <= metrics["consistency.student_acc"] <= 1


def test_consistency_views_can_be_swapped():
    from fxquant.config import ConsistencyConfig
    from fxquant.train.losses.consistency import ConsistencyLoss

    default = ConsistencyLoss(ConsistencyConfig())
    swapped = ConsistencyLoss(ConsistencyConfig(strong_view="student"))
    assert (default.student_views, default.teacher_views) == ((0,), (1,))
    assert (swapped.student_views, swapped.teacher_views) == ((0, 1), (0,))  # view 0 still feeds the CE
    assert (swapped.student_view, swapped.teacher_view) == (1, 0)


def test_kd_only_training_never_reads_the_labels():
    """``ce_weight = 0`` with a KD loss: the step's loss is the KD term alone, so labels do not change it."""
    torch.manual_seed(0)
    recipe = {"extends": "lsq_w4a4", "train": {"ce_weight": 0.0}, "loss": [{"kind": "kd", "T": 4.0}]}
    qmodel = fxquant.prepare_qat(resnet20(), recipe, torch.randn(2, 1, 28, 28))
    step = fxquant.TrainStep(qmodel, torch.optim.SGD(qmodel.parameters(), lr=0.0), ce_weight=0.0)
    x = torch.randn(8, 1, 28, 28)
    first = step(x, torch.zeros(8, dtype=torch.long))
    second = step(x, torch.ones(8, dtype=torch.long))
    assert "ce" not in first and float(first["loss"]) == pytest.approx(float(second["loss"]), rel=1e-6)
    with pytest.raises(fxquant.FxQuantError, match="nothing to train on"):
        fxquant.TrainStep(fxquant.prepare_qat(resnet20(), "lsq_w4a4"), torch.optim.SGD([torch.zeros(1)]), ce_weight=0)


def test_ds_first_schedule_starts_with_disagreement_only():
    from fxquant.train.coreset import evs_weight

    assert evs_weight(0, 10, "ds_first") == 0.0 and evs_weight(10, 10, "ds_first") == pytest.approx(1.0)
    assert evs_weight(0, 10, "paper") == 1.0


def test_epoch_means_of_sparse_metrics_average_only_the_steps_that_measured_them():
    from fxquant.train.loop import EpochTotals

    totals = EpochTotals(seen=30)
    totals.metric_sums = {"loss": 30.0, "mec.grad_ratio": 0.5 * 10}
    totals.metric_counts = {"loss": 30, "mec.grad_ratio": 10}
    assert totals.means() == {"loss": 1.0, "mec.grad_ratio": 0.5}
