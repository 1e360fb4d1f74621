"""The evaluator's fast forms: Floyd's stratum draws, the readout form on active entries, and the
variance (Neyman) allocation at the dense protocol's precision.

Statistical checks use fixed seeds and thresholds with a false-failure probability below 1e-5 for
a correct implementation (Z = 4.5 standard errors, or the chi-square quantile named in the test).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cis_lightning.core.baselines import SemiNMF
from cis_lightning.core.mixing import Mixing
from cis_lightning.core.models import MLP, ResidualMLP
from cis_lightning.core.task import Instance, Stream, Task
from cis_lightning.evaluation import (
    ReadoutForm,
    draw_stratum_losses,
    evaluate,
    evaluate_at,
    naive_loss_per_feature,
    per_sample_loss,
    samples_for,
    stratum_losses,
)
from cis_lightning.evaluation.readout import FORM_SWITCH, readout_form

from ..conftest import naive_mlp

Z = 4.5


def _chi_square_quantile(dof: int, z: float = Z) -> float:
    """Wilson-Hilferty: the chi-square quantile at the normal quantile z (upper tail ~3e-6 at 4.5)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5], ids=lambda k: f"k={k}")
def test_a_stratum_draw_is_a_uniform_subset_with_uniform_values(k):
    """n = 6: every one of the C(6, k) subsets equally often (chi-square), k active per row, values
    with the moments of U[-1, 1]; k > n / 2 draws the complement, k <= n / 5 is not sparse here."""
    n, rows = 6, 60_000
    task = Task([Instance()], n)
    x = torch.cat([task.sample_active(k, rows // 3, step)[0] for step in range(3)])
    active = x != 0
    assert (active.sum(dim=1) == k).all()
    code = (active.long() * 2 ** torch.arange(n)).sum(dim=1)
    subsets = [sum(2**i for i in c) for c in itertools.combinations(range(n), k)]
    observed = torch.stack([(code == s).sum() for s in subsets]).double()
    assert observed.sum() == rows
    expected = rows / len(subsets)
    chi2 = ((observed - expected).pow(2) / expected).sum().item()
    if len(subsets) > 1:
        assert chi2 < _chi_square_quantile(len(subsets) - 1), chi2
    values = x[active].double()
    assert abs(values.mean().item()) < Z * math.sqrt(1 / 3 / values.numel())
    assert abs(values.pow(2).mean().item() - 1 / 3) < Z * math.sqrt(4 / 45 / values.numel())


def test_active_entries_are_the_sparse_form_of_the_same_draw():
    task = Task([Instance(), Instance(seed=3)], 100)
    for k in (1, 5, 20):
        assert task.sparse_stratum(k)
        feature, value = task.active_entries(k, 500, step=4)
        assert (feature[:, 1:] > feature[:, :-1]).all()  # distinct, increasing
        dense = torch.zeros(500, 100).scatter_(1, feature, value)
        assert torch.equal(task.sample_active(k, 500, step=4)[1], dense)
    assert not task.sparse_stratum(21) and not task.sparse_stratum(0)


def _cases():
    gaussian = Mixing("gaussian")
    return {
        "mlp, gaussian M": (MLP(n_features=30, d_mlp=8, seeds=[0, 1, 2]), gaussian, torch.float32),
        "mlp, tied, clean": (MLP(n_features=30, d_mlp=8, seeds=[0, 1, 2], tied=True), Mixing(), torch.float32),
        "residual, symmetric M": (
            ResidualMLP(n_features=30, d_embed=60, d_mlp=8, seeds=[0, 1, 2]),
            Mixing("gaussian", symmetric=True),
            torch.float32,
        ),
        "mlp, float64": (MLP(n_features=30, d_mlp=8, seeds=[0, 1, 2]), gaussian, torch.float64),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_the_readout_form_equals_the_networks_own_loss(case):
    model, mixing, dtype = _cases()[case]
    task = Task([Instance(0.05, sigma=0.3 * i, mixing=mixing, seed=i) for i in range(3)], 30).to(dtype)
    model = model.to(dtype)
    form = ReadoutForm.of(model, task)
    assert form is not None
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    for k in (1, 3, 6):
        x = task.sample_active(k, 2000, step=1)
        reference = per_sample_loss(model, task, x)
        fast = form.losses(*task.active_entries(k, 2000, step=1))
        torch.testing.assert_close(fast, reference, rtol=tolerance, atol=tolerance * reference.abs().max().item())
        # A dense batch of the stratum takes the same form: the same numbers as `evaluate`'s draw
        part = (2, 0)
        looped = stratum_losses(model, task, task.sample_active(k, 2000, 1, instances=part), part)
        drawn = draw_stratum_losses(model, task, form, k, 2000, 1, Stream.TEST, part)
        torch.testing.assert_close(looped, drawn, rtol=0, atol=0)
        torch.testing.assert_close(looped, reference[list(part)], rtol=tolerance, atol=tolerance * 10)
    # Dense strata and Bernoulli draws (k > n / 5) through the fused dense form, in chunks of rows.
    for k in (7, 18, 30):
        assert not task.sparse_stratum(k)
        x = task.sample_active(k, 3000, step=2)
        reference = per_sample_loss(model, task, x)
        atol = tolerance * reference.abs().max().item()
        torch.testing.assert_close(form.dense_losses(x[0]), reference, rtol=tolerance, atol=atol)
        drawn = draw_stratum_losses(model, task, form, k, 3000, 2, Stream.TEST, (1,))
        torch.testing.assert_close(drawn, reference[[1]], rtol=tolerance, atol=atol)
    x, _ = task.sample_bernoulli(0.7, 3000, step=5)
    reference = per_sample_loss(model, task, x[None].expand(3, *x.shape))
    torch.testing.assert_close(form.dense_losses(x), reference, rtol=tolerance, atol=tolerance * reference.max().item())


def test_networks_without_an_exact_readout_form_evaluate_through_their_forward():
    task = Task([Instance()], 20)
    assert ReadoutForm.of(MLP(n_features=20, d_mlp=5, hidden_bias=True), task) is None
    assert ReadoutForm.of(ResidualMLP(n_features=20, d_embed=40, d_mlp=5, n_layers=2), task) is None
    assert ReadoutForm.of(SemiNMF(n_features=20, d_mlp=5), task) is None


class GeluMLP(MLP):
    """A subclass that changes the forward: the written-out form must not stand in for it."""

    def forward(self, x):
        return super().forward(x) * 1.5


def test_a_subclass_or_the_reference_switch_evaluates_through_the_forward(monkeypatch):
    task = Task([Instance(0.05, sigma=0.1, mixing=Mixing("gaussian"))], 20)
    assert readout_form(GeluMLP(n_features=20, d_mlp=5), task) is None
    model = MLP(n_features=20, d_mlp=5)
    assert readout_form(model, task) is not None
    form_result = evaluate(model, task, n_nonempty=4000, batch_size=4096)
    monkeypatch.setenv(FORM_SWITCH, "reference")
    assert readout_form(model, task) is None
    reference = evaluate(model, task, n_nonempty=4000, batch_size=4096)
    torch.testing.assert_close(form_result.loss_per_feature, reference.loss_per_feature, rtol=1e-5, atol=0)


def _dense_precision_stderr(dense, n_nonempty: int, task: Task, q: float) -> torch.Tensor:
    """The dense protocol's standard error at `n_nonempty` non-empty samples, from a dense run of
    dense.n_samples samples (the standard error scales as 1 / sqrt(samples))."""
    return dense.stderr * math.sqrt(dense.n_samples / samples_for(n_nonempty, task, [q] * task.n_instances))


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5])
def test_variance_allocation_is_unbiased_at_the_dense_precision_from_fewer_samples(p):
    """Against the dense protocol itself: within Z combined standard errors, a standard error no larger
    than the dense one at the same number of non-empty samples (10% for the estimates' own noise:
    each standard error is itself estimated from a few thousand samples), from fewer samples."""
    n, n_nonempty = 40, 10_000
    task = Task([Instance(p), Instance(p, sigma=0.2, mixing=Mixing("gaussian"), seed=1)], n)
    model = MLP(n_features=n, d_mlp=10, seeds=[0, 1])
    result = evaluate(model, task, n_nonempty, allocation="variance", pilot_samples=1000)
    dense = evaluate(model, task, 4 * n_nonempty, batch_size=40_000, method="dense")
    difference = (result.loss_per_feature - dense.loss_per_feature).abs()
    assert (difference < Z * (result.stderr.pow(2) + dense.stderr.pow(2)).sqrt()).all()
    assert (result.stderr <= 1.1 * _dense_precision_stderr(dense, n_nonempty, task, p)).all()
    assert result.n_samples < samples_for(n_nonempty, task, [p, p])


def test_variance_allocation_keeps_the_naive_model_exact():
    """The naive loss is additive over features: L / p = (n - d) / n / 6 at every p, within stderr."""
    n, d = 30, 10
    model = naive_mlp(n, d)
    for result in evaluate_at(model, Task([Instance()], n), [0.001, 0.05, 0.5], n_nonempty=5_000):
        assert abs(result.loss_per_feature.item() - naive_loss_per_feature(n, d)) < Z * result.stderr.item() + 1e-9


def test_evaluating_at_several_p_by_variance_meets_the_dense_precision_at_each():
    n, n_nonempty, qs = 30, 5_000, [0.005, 0.05, 0.5]
    task = Task([Instance(feature_probability=0.02), Instance(0.3, sigma=0.2, mixing=Mixing("gaussian"), seed=1)], n)
    model = MLP(n_features=n, d_mlp=8, seeds=[0, 1])
    for q, result in zip(qs, evaluate_at(model, task, qs, n_nonempty=n_nonempty), strict=True):
        dense = evaluate(model, task, 4 * n_nonempty, batch_size=20_000, feature_probability=[q, q], method="dense")
        difference = (result.loss_per_feature - dense.loss_per_feature).abs()
        assert (difference < Z * (result.stderr.pow(2) + dense.stderr.pow(2)).sqrt()).all()
        assert (result.stderr <= 1.1 * _dense_precision_stderr(dense, n_nonempty, task, q)).all()


def test_the_dense_form_in_chunks_of_rows_equals_it_in_one(monkeypatch):
    from cis_lightning.evaluation import readout

    model, mixing, _ = _cases()["mlp, gaussian M"]
    task = Task([Instance(0.5, sigma=0.3, mixing=mixing, seed=i) for i in range(3)], 30)
    x, _ = task.sample_bernoulli(0.5, 1000, step=1)
    whole = ReadoutForm.of(model, task).dense_losses(x)
    monkeypatch.setattr(readout, "_CHUNK_NUMBERS", 3 * (2 * 8 + 2 * 30) * 64)  # 64 rows a chunk: 16 chunks
    torch.testing.assert_close(ReadoutForm.of(model, task).dense_losses(x), whole, rtol=1e-6, atol=1e-7)
