"""Known answers for the analysis functions: weights built from M's own eigen- or singular vectors,
hand-made naive models, and isotropic random weights whose expectations are closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from cis_lightning.analysis import (
    FeatureLoss,
    alignment_summary,
    direction_energy,
    effective_rank,
    eigen_alignment,
    eigen_basis,
    entry_fit,
    input_output_response,
    interference,
    per_feature_loss,
    principal_angles,
    squared_error,
    subspace_energy,
    svd_alignment,
    total_mixing,
    weight_products,
)
from cis_lightning.core.loss import per_sample_loss
from cis_lightning.core.mixing import Mixing, embedding_mixing
from cis_lightning.core.models import MLP, ResidualMLP
from cis_lightning.core.task import Instance, Stream, Task
from cis_lightning.evaluation import evaluate


def symmetric_gaussian(n: int, k: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, n, n, generator=g, dtype=torch.float64)
    return (a + a.transpose(1, 2)) / 2


def mlp_with(w_in: torch.Tensor, w_out: torch.Tensor) -> MLP:
    """An MLP (K instances) whose weights are exactly w_in (K, h, n) and w_out (K, n, h)."""
    k, h, n = w_in.shape
    net = MLP(n_features=n, d_mlp=h, seeds=list(range(k)))
    with torch.no_grad():
        net.w_in.copy_(w_in)
        net.w_out.copy_(w_out)
    return net


def naive_mlp(n: int, h: int, k: int = 1) -> MLP:
    """The naive model: neuron a reads and writes feature a (a < h); features >= h get nothing."""
    eye = torch.eye(n)[:h]  # (h, n)
    return mlp_with(eye.expand(k, h, n).clone(), eye.T.expand(k, n, h).clone())


def clean_task(n: int, p: float = 0.05, k: int = 1) -> Task:
    return Task([Instance(feature_probability=p, seed=s) for s in range(k)], n)


def test_eigen_basis_is_the_symmetric_parts_spectrum_in_descending_order():
    n = 6
    q = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).Q
    values = torch.tensor([0.5, -2.0, 3.0, 0.0, -0.1, 1.0], dtype=torch.float64)
    antisymmetric = torch.triu(torch.ones(n, n, dtype=torch.float64), 1)
    antisymmetric = antisymmetric - antisymmetric.T
    m = (q @ torch.diag(values) @ q.T + antisymmetric)[None]  # the antisymmetric part is ignored
    got_values, e = eigen_basis(m)
    assert torch.allclose(got_values[0], values.sort(descending=True).values)
    sym = (m + m.transpose(1, 2)) / 2
    assert torch.allclose(sym @ e, e * got_values[:, None, :], atol=1e-12)


def test_weights_from_the_top_eigenvectors_align_perfectly_and_ignore_the_rest():
    n, h, k = 12, 5, 3
    m = symmetric_gaussian(n, k)
    _, e = eigen_basis(m)
    top = e[:, :, :h]
    cos = eigen_alignment(top.transpose(1, 2), top, m)  # P = E_top E_top^T, the projector
    assert torch.allclose(cos[:, :h], torch.ones(k, h, dtype=cos.dtype), atol=1e-10)
    assert torch.allclose(cos[:, h:], torch.zeros(k, n - h, dtype=cos.dtype), atol=1e-10)


def test_eigen_alignment_is_one_everywhere_for_p_equal_to_the_symmetric_m():
    # P = M_sym maps E_i to lambda_i E_i: cos = sign(lambda_i).
    n = 8
    m = symmetric_gaussian(n)
    values, _ = eigen_basis(m)
    u, s, vh = torch.linalg.svd(m[0])
    cos = eigen_alignment((torch.diag(s) @ vh)[None], u[None], m)
    assert torch.allclose(cos, torch.sign(values), atol=1e-10)


def test_svd_alignment_of_the_truncated_svd_of_i_plus_m():
    n, h = 10, 4
    m = 0.3 * torch.randn(1, n, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(torch.eye(n, dtype=torch.float64) + m)
    w_in, w_out = vh[:, :h], u[:, :, :h] * s[:, None, :h]  # P V_i = S_i U_i for i < h, 0 beyond
    cos = svd_alignment(w_in, w_out, m)
    assert torch.allclose(cos[:, :h], torch.ones(1, h, dtype=cos.dtype), atol=1e-10)
    assert torch.allclose(cos[:, h:], torch.zeros(1, n - h, dtype=cos.dtype), atol=1e-10)
    full = svd_alignment(torch.eye(n, dtype=torch.float64)[None], torch.eye(n, dtype=torch.float64)[None] + m, m)
    assert torch.allclose(full, torch.ones_like(full), atol=1e-10)  # P = I + M itself


def test_energy_of_weights_built_from_the_top_eigenvectors_is_all_in_the_top_subspace():
    n, h = 12, 5
    m = symmetric_gaussian(n, 2)
    _, e = eigen_basis(m)
    top = e[:, :, :h]
    energy = subspace_energy(top.transpose(1, 2), 3.0 * top, m)
    for key in ("in_top", "out_top"):
        assert torch.allclose(energy[key], torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(energy["random_top"], torch.full((2,), h / n, dtype=torch.float64))


def test_isotropic_random_weights_hold_about_dim_over_n_of_their_energy():
    # For Gaussian W the energy fraction in any fixed d-dim subspace is Beta(h d / 2, h (n - d) / 2):
    # mean d / n, standard deviation 0.01 for n = 100, h = 50, d = 50.
    n, h = 100, 50
    g = torch.Generator().manual_seed(3)
    m = symmetric_gaussian(n, seed=4)
    w_in, w_out = torch.randn(1, h, n, generator=g), torch.randn(1, n, h, generator=g)
    energy = subspace_energy(w_in, w_out, m)
    for kind in ("in", "out"):
        assert abs(energy[f"{kind}_top"].item() - h / n) < 0.05
        assert abs(energy[f"{kind}_positive"].item() - energy["random_positive"].item()) < 0.05
    # A symmetric Gaussian matrix has about half of its eigenvalues positive.
    assert 0.35 < energy["random_positive"].item() < 0.65


def test_direction_energy_rows_sum_to_one():
    g = torch.Generator().manual_seed(5)
    w_in, w_out = torch.randn(2, 4, 9, generator=g), torch.randn(2, 9, 4, generator=g)
    _, e = eigen_basis(symmetric_gaussian(9, 2))
    for share in direction_energy(w_in, w_out, e):
        assert torch.allclose(share.sum(-1), torch.ones(2, dtype=share.dtype))


def test_the_zero_mixing_matrix_has_no_positive_subspace():
    energy = subspace_energy(torch.randn(1, 3, 6), torch.randn(1, 6, 3), torch.zeros(1, 6, 6))
    assert energy["random_positive"].item() == 0 and energy["in_positive"].item() == 0


def test_principal_angles_are_zero_for_the_top_subspace_and_ninety_degrees_for_its_complement():
    n, h = 10, 4
    m = symmetric_gaussian(n)
    _, e = eigen_basis(m)
    top, bottom = e[:, :, :h], e[:, :, n - h :]
    angle_in, angle_out = principal_angles(top.transpose(1, 2), top, m)
    assert angle_in.shape == (1, h) and torch.allclose(angle_in, torch.zeros_like(angle_in), atol=1e-6)
    assert torch.allclose(angle_out, torch.zeros_like(angle_out), atol=1e-6)
    angle_in, angle_out = principal_angles(bottom.transpose(1, 2), bottom, m)
    assert torch.allclose(angle_in, torch.full_like(angle_in, math.pi / 2), atol=1e-6)


def test_principal_angle_of_a_rotated_line_in_the_plane():
    # M = diag(1, -1): the top eigenvector is e_1; a weight row (cos a, sin a) is at angle a.
    a = 0.3
    m = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))[None]
    w_in = torch.tensor([[[math.cos(a), math.sin(a)]]], dtype=torch.float64)
    angle_in, angle_out = principal_angles(w_in, 2 * w_in.transpose(1, 2), m)
    assert math.isclose(angle_in.item(), a, abs_tol=1e-9) and math.isclose(angle_out.item(), a, abs_tol=1e-9)


def test_entry_fit_of_p_equal_c_times_m_has_slope_c():
    n, h, c = 10, 3, 0.7
    g = torch.Generator().manual_seed(6)
    a, b = (
        torch.randn(2, n, h, generator=g, dtype=torch.float64),
        torch.randn(2, h, n, generator=g, dtype=torch.float64),
    )
    m = a @ b  # rank h, with a varying diagonal
    fit = entry_fit(b, c * a, m)
    assert torch.allclose(fit.offdiag_slope, torch.full((2,), c, dtype=torch.float64))
    assert torch.allclose(fit.offdiag_correlation, torch.ones(2, dtype=torch.float64))
    assert torch.allclose(fit.diag_slope, torch.full((2,), c, dtype=torch.float64))
    assert torch.allclose(fit.diag_intercept, torch.zeros(2, dtype=torch.float64), atol=1e-12)


def test_entry_fit_with_a_zero_diagonal_m_reports_the_mean_diagonal_and_no_slope():
    # P = identity on the first h features: mean diagonal h / n, no off-diagonal entries.
    n, h = 10, 4
    m = symmetric_gaussian(n)
    m.diagonal(dim1=1, dim2=2).zero_()
    net = naive_mlp(n, h)
    fit = entry_fit(*net.effective_weights(), m)
    assert torch.isnan(fit.diag_slope).all()
    assert math.isclose(fit.diag_intercept.item(), h / n)
    assert fit.offdiag_slope.item() == 0


def test_weight_products_sum_over_neurons_to_the_diagonal_of_w_out_w_in():
    g = torch.Generator().manual_seed(7)
    w_in, w_out = torch.randn(2, 5, 8, generator=g), torch.randn(2, 8, 5, generator=g)
    bars = weight_products(w_in, w_out)
    assert bars.shape == (2, 5, 8)
    assert torch.allclose(bars.sum(1), (w_out @ w_in).diagonal(dim1=1, dim2=2), atol=1e-6)


def test_interference_of_the_naive_model_is_the_identity_on_its_features_at_plus_one_and_zero_at_minus_one():
    n, h = 7, 3
    plus, minus = interference(naive_mlp(n, h, k=2), clean_task(n, k=2))
    expected = torch.diag(torch.tensor([1.0] * h + [0.0] * (n - h)))
    assert torch.equal(plus, expected.expand(2, n, n))
    assert torch.equal(minus, torch.zeros(2, n, n))


def test_input_output_response_of_the_naive_model_is_relu_on_represented_features_and_zero_elsewhere():
    n, h = 6, 2
    x, y_hat, y = input_output_response(naive_mlp(n, h), clean_task(n), n_points=11)
    assert y_hat.shape == (1, n, 11) and y.shape == (1, n, 11)
    assert torch.allclose(y_hat[0, :h], torch.relu(x).expand(h, -1))
    assert torch.equal(y_hat[0, h:], torch.zeros(n - h, 11))
    assert torch.allclose(y[0], torch.relu(x).expand(n, -1))  # labels ReLU(x) with M = 0


def test_residual_model_response_is_its_effective_mlp_minus_its_own_mixing():
    # y_hat - x = W_out' ReLU(W_in' x) - (I - W_E W_E^T) x (the README's derivation).
    n = 5
    net = ResidualMLP(n_features=n, d_embed=16, d_mlp=3)
    x, y_hat, _ = input_output_response(net, clean_task(n), n_points=7)
    w_in, w_out = net.effective_weights()
    m = embedding_mixing(net.w_embed)
    for i in range(n):
        inputs = x[:, None] * torch.eye(n)[i]  # (S, n)
        expected = torch.relu(inputs @ w_in[0].T) @ w_out[0].T - inputs @ m[0].T
        assert torch.allclose(y_hat[0, i], expected[:, i], atol=1e-5)


def test_total_mixing_is_sigma_m_for_the_mlp_and_adds_i_minus_ggt_for_the_residual_model():
    n = 6
    task = Task([Instance(sigma=0.5, mixing=Mixing(kind="gaussian", symmetric=True))], n)
    assert torch.allclose(total_mixing(MLP(n_features=n, d_mlp=2), task), 0.5 * task.mixing)
    residual = ResidualMLP(n_features=n, d_embed=8, d_mlp=2)
    expected = embedding_mixing(residual.w_embed) + 0.5 * task.mixing
    assert torch.allclose(total_mixing(residual, task), expected)


def test_per_feature_loss_of_the_naive_model_is_zero_on_represented_features_and_one_sixth_elsewhere():
    # Represented feature j: output ReLU(x_j) = label, error 0. Unrepresented: output 0, error
    # ReLU(x_j)^2, E = p * E[ReLU(u)^2] = p / 6 for u ~ U[-1, 1]; divided by p: 1/6. The estimate's
    # standard error is sqrt(p E[u^4] / 2 / N) / p = sqrt(0.1 / (N p)) = 0.003 for N = 1e5, p = 0.1.
    n, h, p = 20, 8, 0.1
    loss = per_feature_loss(naive_mlp(n, h), clean_task(n, p), n_samples=100_000, batch_size=50_000)
    assert loss.shape == (1, n)
    assert torch.equal(loss[0, :h], torch.zeros(h, dtype=loss.dtype))
    assert torch.allclose(loss[0, h:], torch.full((n - h,), 1 / 6, dtype=loss.dtype), atol=0.016)


def test_feature_loss_metric_averages_over_features_to_the_usual_loss_per_feature():
    n, p = 10, 0.1
    task = Task([Instance(feature_probability=p, sigma=0.2, mixing=Mixing(kind="gaussian"))], n)
    net = MLP(n_features=n, d_mlp=4)
    metric = FeatureLoss([p], n)
    with torch.no_grad():
        x = task.sample(4096, 0, Stream.ANALYSIS)
        metric.update(squared_error(net, task, x))
        expected = per_sample_loss(net, task, x).double().mean(1) / p
    assert torch.allclose(metric.compute().mean(-1), expected)


def test_effective_rank_of_the_identity_is_n():
    assert math.isclose(effective_rank(torch.eye(7)).item(), 7, rel_tol=1e-5)


def test_alignment_summary_of_a_perfect_top_subspace_model():
    n, h = 12, 4
    m = symmetric_gaussian(n)
    _, e = eigen_basis(m)
    top = e[:, :, :h]
    s = alignment_summary(top.transpose(1, 2), top, m)
    assert math.isclose(s["cos_eig_top"].item(), 1, abs_tol=1e-9) and abs(s["cos_eig_rest"].item()) < 1e-9
    assert math.isclose(s["energy_in_top"].item(), 1) and math.isclose(s["energy_random_top"].item(), h / n)
    assert s["angle_in_deg"].item() < 1e-3
    assert math.isclose(s["diag_mean"].item(), h / n, rel_tol=1e-9)  # trace of a rank-h projector / n


@pytest.mark.parametrize("k", [1, 3])
def test_every_summary_value_has_one_entry_per_instance(k):
    m = symmetric_gaussian(9, k)
    s = alignment_summary(torch.randn(k, 3, 9), torch.randn(k, 9, 3), m)
    assert all(v.shape == (k,) and torch.isfinite(v).all() for v in s.values())


@pytest.mark.parametrize("p", [0.001, 0.3, 1.0])
def test_the_naive_model_is_at_the_naive_loss_at_every_evaluation_p_including_one(p):
    # The Figures callback's loss-against-p grid runs from 1e-3 to 1. Unrepresented active features
    # cost E[ReLU(u)^2] = 1/6 each whatever else is active, so L / p = (n - h) / n / 6 at every p.
    n, h = 20, 8
    result = evaluate(naive_mlp(n, h), clean_task(n), n_nonempty=4000, stream=Stream.ANALYSIS, feature_probability=[p])
    assert torch.allclose(result.loss_per_feature, torch.tensor([(n - h) / n / 6], dtype=torch.float64), rtol=0.05)
