"""The input distribution is exactly the paper's, on every path the sampler takes.

Each feature is active independently with probability p, an active value is uniform on [-1, 1]
(the paper's code: a dense `rand < p` mask times dense `2 rand - 1`). The sparse path (p <= 0.2,
only active entries drawn, geometric gaps), the dense path (p > 0.2) and exactly-one-active are
checked against the theory and against that dense reference draw:

- active count per sample: chi-square goodness of fit to Binomial(n, p), and a chi-square test
  of homogeneity against the reference's counts;
- per-feature frequency: sum_i (c_i - N p)^2 / (N p (1 - p)) is chi-square with n degrees of
  freedom (features are independent), chi-square(n - 1) for the multinomial of exactly-one-active;
- values: Kolmogorov-Smirnov distance to U[-1, 1] below the DKW bound
  P(sup |F_N - F| > e) <= 2 exp(-2 N e^2), and the two-sample distance to the reference below
  c sqrt((N + M) / (N M)), c = sqrt(ln(2 / alpha) / 2).

Every check fails a correct sampler with probability at most ALPHA = 1e-6 (about 30 checks: below
3e-5 for any seed); the seeds are fixed, so the outcome is reproducible. A wrong distribution
(p off by 5%, values on [0, 1]) fails them by many orders of magnitude (the last test).
"""

from __future__ import annotations

import math

import pytest
import torch

from cis_lightning.core.task import Instance, Task

ALPHA = 1e-6
N_FEATURES = 40


def chi_square_survival(statistic: float, degrees: int) -> float:
    """P(chi^2_degrees > statistic): the regularised upper incomplete gamma function Q(d/2, s/2)."""
    return torch.special.gammaincc(torch.tensor(degrees / 2, dtype=torch.float64), torch.tensor(statistic / 2)).item()


def reference_draw(n_samples: int, p: float, seed: int) -> torch.Tensor:
    """The paper's dense draw: a Bernoulli(p) mask times uniform values on [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_samples, N_FEATURES, generator=generator) < p
    return (torch.rand(n_samples, N_FEATURES, generator=generator) * 2 - 1) * mask


def draw(path: str, n_samples: int, p: float) -> torch.Tensor:
    """n_samples rows from cis_lightning's sampler (several batches, so steps are covered too)."""
    task = Task([Instance(feature_probability=p, seed=11)], N_FEATURES, exactly_one_active=path == "one active")
    batch = 2000
    return torch.cat([task.sample(batch, step)[0] for step in range(n_samples // batch)])


def binomial_pmf(n: int, p: float) -> torch.Tensor:
    k = torch.arange(n + 1, dtype=torch.float64)
    log_choose = math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
    return torch.exp(log_choose + k * math.log(p) + (n - k) * math.log1p(-p))


def pooled_bins(expected: torch.Tensor, *observed: torch.Tensor) -> list[torch.Tensor]:
    """Merge the tail bins of counts 0..n so that every bin expects at least 5 (chi-square validity)."""
    edges, total = [], 0.0
    for k in range(len(expected)):
        total += float(expected[k])
        if total >= 5:
            edges.append(k + 1)
            total = 0.0
    edges[-1] = len(expected)
    starts = [0, *edges[:-1]]
    return [
        torch.stack([series[a:b].sum() for a, b in zip(starts, edges, strict=True)]) for series in (expected, *observed)
    ]


def active_counts(x: torch.Tensor) -> torch.Tensor:
    return torch.bincount((x != 0).sum(dim=1), minlength=N_FEATURES + 1).double()


PATHS = [("sparse", 0.03), ("dense", 0.3)]


@pytest.mark.parametrize("path, p", PATHS)
def test_active_count_per_sample_is_binomial(path, p):
    n_samples = 40_000
    for x in (draw(path, n_samples, p), reference_draw(n_samples, p, seed=5)):
        expected, observed = pooled_bins(binomial_pmf(N_FEATURES, p) * n_samples, active_counts(x))
        statistic = ((observed - expected).pow(2) / expected).sum().item()
        assert chi_square_survival(statistic, len(expected) - 1) > ALPHA


@pytest.mark.parametrize("path, p", PATHS)
def test_active_count_per_sample_matches_the_reference_draw(path, p):
    ours, reference = active_counts(draw(path, 40_000, p)), active_counts(reference_draw(40_000, p, seed=6))
    pooled = ours + reference
    expected_ours, ours, reference, pooled = pooled_bins(pooled / 2, ours, reference, pooled)
    statistic = 0.0
    for observed in (ours, reference):  # homogeneity: both halves against the pooled proportions
        expected = pooled * observed.sum() / pooled.sum()
        statistic += ((observed - expected).pow(2) / expected).sum().item()
    assert chi_square_survival(statistic, len(pooled) - 1) > ALPHA


@pytest.mark.parametrize("path, p", [*PATHS, ("one active", 1 / N_FEATURES)])
def test_every_feature_is_active_equally_often(path, p):
    n_samples = 40_000
    counts = (draw(path, n_samples, p) != 0).sum(dim=0).double()
    if path == "one active":
        assert ((draw(path, 4000, p) != 0).sum(dim=1) == 1).all()
        expected = n_samples / N_FEATURES
        statistic, degrees = ((counts - expected).pow(2) / expected).sum().item(), N_FEATURES - 1
    else:
        statistic = ((counts - n_samples * p).pow(2) / (n_samples * p * (1 - p))).sum().item()
        degrees = N_FEATURES
    assert chi_square_survival(statistic, degrees) > ALPHA


def ks_distance_to_uniform(values: torch.Tensor) -> float:
    """sup |F_N - F| for F the uniform CDF on [-1, 1]."""
    v = torch.sort(values.double()).values
    n = len(v)
    cdf = (v + 1) / 2
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - cdf).max().item(), (cdf - (i - 1) / n).max().item())


def ks_two_sample(a: torch.Tensor, b: torch.Tensor) -> float:
    grid = torch.sort(torch.cat([a, b]).double()).values
    cdf_a = torch.searchsorted(torch.sort(a.double()).values, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(torch.sort(b.double()).values, grid, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


@pytest.mark.parametrize("path, p", [*PATHS, ("one active", 1 / N_FEATURES)])
def test_active_values_are_uniform_on_minus_one_one(path, p):
    x = draw(path, 40_000, p)
    values = x[x != 0]
    n = len(values)
    assert n > 10_000
    assert ks_distance_to_uniform(values) < math.sqrt(math.log(2 / ALPHA) / (2 * n))  # DKW
    reference = reference_draw(40_000, p, seed=7)
    reference = reference[reference != 0]
    m = len(reference)
    c = math.sqrt(math.log(2 / ALPHA) / 2)
    assert ks_two_sample(values, reference) < c * math.sqrt((n + m) / (n * m))


def test_the_checks_reject_a_wrong_distribution():
    """The same statistics fail clearly for p off by 5% and for values on [0, 1]."""
    p, n_samples = 0.03, 40_000
    wrong_p = reference_draw(n_samples, p * 1.05, seed=8)
    expected, observed = pooled_bins(binomial_pmf(N_FEATURES, p) * n_samples, active_counts(wrong_p))
    statistic = ((observed - expected).pow(2) / expected).sum().item()
    assert chi_square_survival(statistic, len(expected) - 1) < ALPHA
    x = reference_draw(n_samples, p, seed=9).abs()
    values = x[x != 0]
    assert ks_distance_to_uniform(values) > math.sqrt(math.log(2 / ALPHA) / (2 * len(values)))
