"""Dense strata filled by post-stratified Bernoulli draws (`BernoulliDraw`, `Task.sample_bernoulli`).

At a high p most samples have more than n / 5 active features, and drawing them one exact-k subset at
a time costs more than the dense protocol itself. The plan then draws the input distribution at that
p and counts each sample for the stratum of its number of active features; the strata the Bernoulli
draws would rarely hit keep their own draws. Known answers come from brute-force dense batches with
their standard error (agreement within 4.5 combined standard errors, as tests/evaluation/test_evaluation.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from cis_lightning.core.mixing import Mixing
from cis_lightning.core.models import MLP
from cis_lightning.core.task import Instance, Stream, Task
from cis_lightning.evaluation import (
    BernoulliDraw,
    StratifiedLossPerFeature,
    StratumDraw,
    evaluate,
    evaluate_at,
    exact_losses,
    exact_strata,
    plan_strata,
)

from .test_evaluation import _agree

N = 30


def _task(*ps: float) -> Task:
    return Task([Instance(p, sigma=0.2, mixing=Mixing("gaussian"), seed=i) for i, p in enumerate(ps)], N)


def test_bernoulli_samples_are_the_input_distribution():
    """Active with probability p, independently per feature; active values uniform on [-1, 1];
    the count is the mask's; the same draw for the same (stream, p, step), another for another step."""
    task, p, b = _task(0.4), 0.4, 200_000
    x, n_active = task.sample_bernoulli(p, b, step=3)
    assert x.shape == (b, N) and n_active.shape == (b,)
    assert torch.equal(n_active, (x != 0).sum(dim=1))  # a value of exactly 0 has probability ~2^-24
    frequency = (x != 0).double().mean(dim=0)  # per feature: p within 5 standard errors
    assert ((frequency - p).abs() < 5 * math.sqrt(p * (1 - p) / b)).all()
    values = x[x != 0].double()
    assert values.min() >= -1 and values.max() <= 1
    assert abs(values.mean()) < 5 * math.sqrt(1 / 3 / values.numel())
    assert abs(values.pow(2).mean() - 1 / 3) < 5 * math.sqrt(4 / 45 / values.numel())  # Var(u^2) = 1/5 - 1/9
    again, _ = task.sample_bernoulli(p, b, step=3)
    assert torch.equal(x, again)
    assert not torch.equal(x, task.sample_bernoulli(p, b, step=4)[0])
    assert not torch.equal(x, task.sample_bernoulli(p, b, step=3, stream=Stream.VALIDATE)[0])
    assert not torch.equal(x[:, :1], task.sample_active(1, b, step=3)[0, :, :1])  # apart from the strata's keys


def test_a_high_p_fills_its_dense_bulk_with_bernoulli_draws_and_its_tails_with_their_own():
    task = _task(0.5)
    plan = plan_strata(task, [0.5], 20_000, 4096, exact=(0, 1))
    bernoulli = [d for d in plan.draws if isinstance(d, BernoulliDraw)]
    strata = {d.k for d in plan.draws if isinstance(d, StratumDraw)}
    assert bernoulli and all(d.q == 0.5 and d.instances is None for d in bernoulli)
    size = sum(d.size for d in bernoulli)
    assert size == pytest.approx(20_000, rel=0.01)  # proportional: the dense protocol's sample count
    expected = size * plan.probability[0]
    bulk = [k for k in plan.sampled if not task.sparse_stratum(k) and expected[k] >= 64]
    assert bulk and not strata & set(bulk)  # the bulk comes from the Bernoulli draws only
    assert set(plan.sampled) - set(bulk) <= strata  # every other stratum keeps its own draws


def test_a_low_p_draws_no_bernoulli_batches():
    """At p = 0.05 almost every sample has at most n / 5 active features: no dense bulk to fill."""
    plan = plan_strata(_task(0.05), [0.05], 20_000, 4096, exact=(0, 1))
    assert not any(isinstance(d, BernoulliDraw) for d in plan.draws)


@pytest.mark.parametrize("allocation", ["proportional", "variance"])
def test_a_high_p_estimate_agrees_with_brute_force(allocation):
    task = _task(0.5, 0.9)
    model = MLP(n_features=N, d_mlp=8, seeds=[0, 1])
    stratified = evaluate(model, task, n_nonempty=20_000, batch_size=4096, allocation=allocation)
    dense = evaluate(model, task, n_nonempty=40_000, batch_size=20_000, method="dense")
    _agree(stratified, dense)
    # The dense protocol's precision at 20,000 (non-empty) samples, to the error of the estimated spreads.
    dense_at_20_000 = dense.stderr * math.sqrt(dense.n_samples / 20_000)
    assert (stratified.stderr < 1.1 * dense_at_20_000).all()


def test_instances_at_different_p_each_get_their_own_bernoulli_draws():
    """A mixed-p run (one sparse instance, two dense ones): Bernoulli draws at each dense p for its
    instance only, and each instance's estimate agrees with its own brute force."""
    task = _task(0.02, 0.5, 0.8)
    model = MLP(n_features=N, d_mlp=8, seeds=[0, 1, 2])
    plan = plan_strata(task, [0.02, 0.5, 0.8], 10_000, 4096, exact=(0, 1))
    groups = {(d.q, d.instances) for d in plan.draws if isinstance(d, BernoulliDraw)}
    assert groups == {(0.5, (1,)), (0.8, (2,))}
    stratified = evaluate(model, task, n_nonempty=10_000, batch_size=4096)
    dense = evaluate(model, task, n_nonempty=40_000, batch_size=20_000, method="dense")
    _agree(stratified, dense)


def test_evaluating_at_several_high_p_shares_the_bernoulli_draws():
    task = _task(0.1)
    model = MLP(n_features=N, d_mlp=8, seeds=[0])
    qs = [0.3, 0.6]
    shared = evaluate_at(model, task, qs, n_nonempty=10_000, batch_size=4096)
    for q, result in zip(qs, shared, strict=True):
        dense = evaluate(model, task, n_nonempty=40_000, batch_size=20_000, feature_probability=[q], method="dense")
        _agree(result, dense)


def test_a_mixed_batch_adds_what_its_strata_one_by_one_would():
    """A batch of any strata (update with n_active) = update of each stratum's share of the batch;
    samples of exact strata are left out."""
    task = _task(0.3, 0.3)
    model = MLP(n_features=N, d_mlp=8, seeds=[0, 1])
    plan = plan_strata(task, [0.3, 0.3], 5_000, 4096, exact=exact_strata(model))
    exact = exact_losses(model, task, plan.exact)
    mixed, one_by_one = StratifiedLossPerFeature(plan, exact), StratifiedLossPerFeature(plan, exact)
    losses = torch.rand(2, 500, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    n_active = torch.randint(0, 12, (500,), generator=torch.Generator().manual_seed(1))
    mixed.update(None, losses, n_active=n_active)
    for k in plan.sampled:
        if (n_active == k).any():
            one_by_one.update(k, losses[:, n_active == k])
    for name in ("total", "total_sq", "count"):
        torch.testing.assert_close(getattr(mixed, name), getattr(one_by_one, name))
    assert float(mixed.count.sum()) == 2 * float(((n_active >= 2) & (n_active <= max(plan.sampled))).sum())
