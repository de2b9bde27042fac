"""ACS: scores against the formula, class balance, determinism, schedules, sampler, label noise, recipes."""

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxquant
from fxquant.config.sections import CORESET_SCHEDULES as SCHEDULES
from fxquant.config.sections import CoresetConfig
from fxquant.errors import RecipeError
from fxquant.train.coreset import (
    CoresetSampler,
    NoisyLabels,
    evs_weight,
    random_subset,
    score_samples,
    select,
)
from fxquant.train.distributed import DistInfo


class Linear(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(x)


def test_scores_match_the_formula():
    torch.manual_seed(0)
    x, y = torch.randn(37, 6), torch.randint(0, 4, (37,))
    q, fp = Linear(0), Linear(1)
    scores = score_samples(q, fp, torch.utils.data.TensorDataset(x, y), batch_size=8)
    for i in range(37):
        p_q = torch.softmax(q(x[i : i + 1]), 1)[0]
        p_fp = torch.softmax(fp(x[i : i + 1]), 1)[0]
        onehot = torch.zeros(4)
        onehot[y[i]] = 1
        assert float(scores.evs[i]) == pytest.approx(math.dist(p_q.tolist(), onehot.tolist()), rel=1e-5)
        assert float(scores.ds[i]) == pytest.approx(math.dist(p_q.tolist(), p_fp.tolist()), rel=1e-5, abs=1e-7)
    assert torch.equal(scores.labels, y)
    assert torch.allclose(scores.combined(0.25), 0.25 * scores.evs + 0.75 * scores.ds)


@given(fraction=st.floats(0.01, 1.0), seed=st.integers(0, 1000))
def test_selection_is_class_balanced_top_scores_and_deterministic(fraction, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (300,), generator=g)
    scores = torch.rand(300, generator=g)
    chosen = select(scores, labels, fraction)
    assert torch.equal(chosen, select(scores, labels, fraction))
    for c in range(5):
        members = torch.nonzero(labels == c).flatten()
        if len(members) == 0:
            continue
        picked = chosen[labels[chosen] == c]
        assert len(picked) == max(1, round(fraction * len(members)))
        rest = members[~torch.isin(members, picked)]
        if len(rest):
            assert float(scores[picked].min()) >= float(scores[rest].max())
    assert torch.equal(random_subset(labels, fraction, seed), random_subset(labels, fraction, seed))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_endpoints(schedule):
    # every schedule goes from EVS only to DS only, except ds_first, which goes the other way
    start, end = (0.0, 1.0) if schedule == "ds_first" else (1.0, 0.0)
    assert evs_weight(0, 10, schedule) == pytest.approx(start, abs=1e-12)
    assert evs_weight(10, 10, schedule) == pytest.approx(end, abs=1e-12)
    values = [evs_weight(t, 10, schedule) for t in range(11)]
    ordered = itertools.pairwise(values if schedule != "ds_first" else values[::-1])
    assert all(a >= b for a, b in ordered)
    assert evs_weight(5, 10, "paper") == pytest.approx(math.cos(math.pi / 4))


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_bad_fraction_is_rejected(fraction):
    with pytest.raises(ValueError, match="fraction"):
        CoresetConfig(fraction)
    with pytest.raises(RecipeError, match=r"data\.coreset\.fraction.*\(0, 1\]"):
        fxquant.load_recipe({"extends": "lsq_w4a4", "data": {"coreset": {"fraction": fraction}}})
    with pytest.raises(ValueError, match="fraction"):
        select(torch.rand(10), torch.zeros(10, dtype=torch.long), fraction)


def test_sampler_splits_the_selection_between_ranks():
    indices = torch.arange(0, 100, 3)
    shares = [list(CoresetSampler(indices, DistInfo(rank, 2), seed=1)) for rank in (0, 1)]
    assert not set(shares[0]) & set(shares[1])
    assert set(shares[0]) | set(shares[1]) <= set(indices.tolist()) and len(shares[0]) == len(shares[1]) == 17
    sampler = CoresetSampler(indices, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    assert sorted(first) == sorted(sampler) and first != list(sampler)


def test_symmetric_label_noise():
    data = torch.utils.data.TensorDataset(torch.zeros(200, 2), torch.arange(200) % 10)
    noisy = NoisyLabels(data, 0.2, num_classes=10, seed=3)
    assert int(noisy.noisy.sum()) == 40
    original = torch.arange(200) % 10
    assert torch.all(noisy.labels[noisy.noisy] != original[noisy.noisy])
    assert torch.equal(noisy.labels[~noisy.noisy], original[~noisy.noisy])


def test_fit_trains_on_the_coreset_only():
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(200, 1, 28, 28), torch.arange(200) % 10)
    qmodel = fxquant.prepare_qat(fxquant.models.resnet20(), "acs10_w4a4")
    assert qmodel.float_model is not None  # the disagreement score needs the FP model
    history = fxquant.fit(qmodel, data, None, {"epochs": 2, "batch_size": 4}, progress=False)
    assert [h.train_samples for h in history] == [20, 20]
    assert all(h.scoring_seconds > 0 for h in history)
