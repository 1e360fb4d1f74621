"""The evaluator: exact single-feature terms, the stratified estimate, and the fallback for biased models.

Known answers come from the closed forms (the naive model) or from brute-force Monte Carlo with
its standard error; agreement is required within 4.5 combined standard errors (two-sided false
failure probability 7e-6 for a Gaussian estimate; the seeds are fixed, so a pass is reproducible).
"""

from __future__ import annotations

import math

import pytest
import torch

from cis_lightning.core.baselines import NaiveOffset, SemiNMF
from cis_lightning.core.errors import ConfigError
from cis_lightning.core.mixing import Mixing
from cis_lightning.core.models import MLP, ResidualMLP
from cis_lightning.core.task import Instance, Stream, Task, select_instances
from cis_lightning.evaluation import (
    active_count_probability,
    evaluate,
    loss_per_feature_limit,
    naive_loss_per_feature,
    per_sample_loss,
    plan_strata,
    single_feature_loss,
    stratum_losses,
)

from ..conftest import naive_mlp

Z = 4.5


def _biased(n: int, d: int, seed: int = 0) -> MLP:
    model = MLP(n_features=n, d_mlp=d, seeds=[seed], hidden_bias=True, output_bias=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.b_hidden.uniform_(-0.2, 0.2, generator=generator)
        model.b_out.uniform_(-0.1, 0.1, generator=generator)
    return model


def test_the_naive_model_has_the_closed_form_loss_exactly():
    """(n - d) / n / 6 at p -> 0 and for exactly-one-active data, with no sampling error at all."""
    n, d = 100, 50
    model = naive_mlp(n, d)
    expected = naive_loss_per_feature(n, d)
    assert loss_per_feature_limit(model, Task([Instance()], n)).item() == pytest.approx(expected, rel=1e-6)
    one_active = evaluate(model, Task([Instance()], n, exactly_one_active=True), n_nonempty=1000)
    assert one_active.loss_per_feature.item() == pytest.approx(expected, rel=1e-6)
    assert one_active.stderr.item() == 0.0
    assert one_active.n_samples == 0  # nothing drawn: the 2n forward passes are the whole evaluation


def test_the_naive_model_is_exact_at_every_p():
    """The naive model's loss is additive over features, so L / p = (n - d) / n / 6 for every p:
    the stratified estimate must find it within its standard error."""
    n, d = 30, 10
    model = naive_mlp(n, d)
    for p in (0.001, 0.05, 0.5):
        result = evaluate(model, Task([Instance(feature_probability=p)], n), n_nonempty=5_000)
        lpf, err = result.loss_per_feature.item(), result.stderr.item()
        assert abs(lpf - naive_loss_per_feature(n, d)) < Z * err + 1e-9, (p, lpf, err)


@pytest.mark.parametrize(
    "model, mixing",
    [
        (MLP(n_features=40, d_mlp=10, seeds=[3]), Mixing("gaussian", symmetric=True)),
        (ResidualMLP(n_features=40, d_embed=100, d_mlp=10, seeds=[3]), Mixing()),
    ],
    ids=["mlp, gaussian M", "residual"],
)
def test_the_exact_single_feature_loss_equals_brute_force_monte_carlo(model, mixing):
    task = Task([Instance(sigma=0.3, mixing=mixing, seed=3)], 40, exactly_one_active=True)
    exact = single_feature_loss(model, task).item()
    with torch.no_grad():
        losses = torch.cat(
            [per_sample_loss(model, task, task.sample(20_000, step, Stream.TEST))[0] for step in range(3)]
        )
    mean, err = losses.double().mean().item(), losses.double().std().item() / math.sqrt(losses.numel())
    assert abs(exact - mean) < Z * err


def _agree(a, b) -> None:
    difference = (a.loss_per_feature - b.loss_per_feature).abs()
    combined = (a.stderr.pow(2) + b.stderr.pow(2)).sqrt()
    assert (difference < Z * combined).all(), (a, b)


def test_the_stratified_estimate_agrees_with_brute_force():
    """Two instances (p = 0.02 and p = 0.3, one with mixing) of a random MLP, against dense batches."""
    task = Task([Instance(feature_probability=0.02), Instance(0.3, sigma=0.2, mixing=Mixing("gaussian"), seed=1)], 30)
    model = MLP(n_features=30, d_mlp=8, seeds=[0, 1])
    stratified = evaluate(model, task, n_nonempty=20_000)
    dense = evaluate(model, task, n_nonempty=20_000, batch_size=20_000, method="dense")
    _agree(stratified, dense)
    # The same number of non-empty samples' worth (dense batches serve every instance the sparsest's
    # count, so compare the sparsest): exact terms and no between-strata variance make it tighter
    # than brute force, and only the non-exact strata are drawn.
    assert stratified.stderr[0] < dense.stderr[0]
    assert stratified.n_samples < dense.n_samples / 2


def test_a_model_with_biases_falls_back_to_sampling_and_agrees_with_brute_force():
    """With biases the empty sample costs something and single features have no closed form."""
    n = 30
    model = _biased(n, 8)
    task = Task([Instance(feature_probability=0.02)], n)
    assert per_sample_loss(model, task, torch.zeros(1, 1, n)).item() > 0
    with pytest.raises(ConfigError, match="biases"):
        single_feature_loss(model, task)
    stratified = evaluate(model, task, n_nonempty=5_000)
    assert stratified.stderr.item() > 0
    _agree(stratified, evaluate(model, task, n_nonempty=10_000, batch_size=20_000, method="dense"))


def test_stratum_weights_are_the_binomial_probabilities():
    task = Task([Instance(feature_probability=0.1), Instance(feature_probability=0.5)], 10)
    weights = active_count_probability(task, [0.1, 0.5])
    assert torch.allclose(weights.sum(dim=1), torch.ones(2, dtype=torch.float64))
    assert weights[0, 0].item() == pytest.approx(0.9**10)
    assert weights[1, 3].item() == pytest.approx(math.comb(10, 3) / 2**10)


def test_an_unknown_method_is_refused():
    with pytest.raises(ConfigError, match="method"):
        evaluate(MLP(n_features=5, d_mlp=2), Task([Instance()], 5), method="fast")


def test_a_stratum_is_drawn_only_for_the_instances_it_matters_to():
    """p = 0.01 and p = 1 share no stratum: the two-instance evaluation is each instance's own, exactly."""
    n = 30
    instances = [Instance(feature_probability=0.01), Instance(1.0, sigma=0.2, mixing=Mixing("gaussian"), seed=1)]
    task = Task(instances, n)
    plan = plan_strata(task, [0.01, 1.0], 5_000, 4096, exact=(0, 1))
    assert plan.instances[n] == (1,)
    assert all(plan.instances[k] == (0,) for k in plan.sampled if k < n)
    together = evaluate(MLP(n_features=n, d_mlp=8, seeds=[0, 1]), task, n_nonempty=5_000, batch_size=4096)
    for k, instance in enumerate(instances):
        alone = evaluate(
            MLP(n_features=n, d_mlp=8, seeds=[instance.seed]), Task([instance], n), n_nonempty=5_000, batch_size=4096
        )
        torch.testing.assert_close(together.loss_per_feature[k : k + 1], alone.loss_per_feature, rtol=1e-6, atol=0)
        torch.testing.assert_close(together.stderr[k : k + 1], alone.stderr, rtol=1e-6, atol=0)
    assert together.stderr[1] > 0  # the dense instance is sampled, not exact


@pytest.mark.parametrize("network", ["MLP", "ResidualMLP", "NaiveOffset", "SemiNMF"])
def test_a_selection_of_instances_computes_what_those_instances_compute_among_all(network):
    n, seeds = 20, [0, 1, 2]
    task = Task([Instance(feature_probability=0.05, sigma=0.1, mixing=Mixing("gaussian"), seed=s) for s in seeds], n)
    model = {
        "MLP": lambda: MLP(n_features=n, d_mlp=6, seeds=seeds, hidden_bias=True),
        "ResidualMLP": lambda: ResidualMLP(n_features=n, d_mlp=6, d_embed=40, seeds=seeds),
        "NaiveOffset": lambda: NaiveOffset(n_features=n, d_mlp=6, seeds=seeds, offset=0.01),
        "SemiNMF": lambda: SemiNMF(n_features=n, d_mlp=6, seeds=seeds),
    }[network]()
    model.fit_to(task)
    x = task.sample_active(3, 64, step=2)
    chosen = (2, 0)
    part = stratum_losses(model, task, task.sample_active(3, 64, step=2, instances=chosen), chosen)
    torch.testing.assert_close(part, per_sample_loss(model, task, x)[list(chosen)])
    view = select_instances(model, chosen)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    for t in view.state_dict().values():
        t.add_(1.0)  # the selection holds copies
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())


def test_evaluating_at_several_p_shares_one_draw_and_agrees_with_brute_force_at_each():
    """evaluate_at(qs) against dense batches at every q, for two instances of a random MLP (one with M)."""
    from cis_lightning.evaluation import evaluate_at

    task = Task([Instance(feature_probability=0.02), Instance(0.3, sigma=0.2, mixing=Mixing("gaussian"), seed=1)], 30)
    model = MLP(n_features=30, d_mlp=8, seeds=[0, 1])
    qs = [0.005, 0.05, 0.5]
    shared = evaluate_at(model, task, qs, n_nonempty=5_000, allocation="proportional")
    for q, result in zip(qs, shared, strict=True):
        alone = evaluate(model, task, n_nonempty=5_000, feature_probability=[q, q], allocation="proportional")
        dense = evaluate(model, task, n_nonempty=20_000, batch_size=20_000, feature_probability=[q, q], method="dense")
        _agree(result, dense)
        assert (result.stderr <= alone.stderr * 1.05).all()  # each p gets at least its own plan's samples
    # Shared draws: fewer samples drawn in all than the p's plans one by one.
    separate = sum(
        evaluate(model, task, n_nonempty=5_000, feature_probability=[q, q], allocation="proportional").n_samples
        for q in qs
    )
    assert len({r.n_samples for r in shared}) >= 1 and max(r.n_samples for r in shared) < separate


def test_the_naive_model_is_exact_at_every_p_of_a_shared_evaluation():
    from cis_lightning.evaluation import evaluate_at

    n, d = 30, 10
    for result in evaluate_at(naive_mlp(n, d), Task([Instance()], n), [0.001, 0.05, 0.5], n_nonempty=5_000):
        lpf, err = result.loss_per_feature.item(), result.stderr.item()
        assert abs(lpf - naive_loss_per_feature(n, d)) < Z * err + 1e-9


def test_stratum_draws_are_common_to_all_instances():
    """Common random numbers: every instance's stratum batch is the same draw."""
    task = Task([Instance(seed=0), Instance(seed=5, feature_probability=0.3)], 20)
    x = task.sample_active(4, 32, step=1)
    assert torch.equal(x[0], x[1])
    assert torch.equal(Task([Instance(seed=9)], 20).sample_active(4, 32, step=1)[0], x[0])
    assert not torch.equal(task.sample_active(4, 32, step=2)[0], x[0])
