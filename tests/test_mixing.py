"""Mixing matrices: each kind has the structure its definition promises."""

import math

import pytest
import torch

from cis_lightning import MIXING_KINDS, ConfigError, Mixing, build_mixing, effective_rank, embedding_mixing
from cis_lightning.mixing import random_embedding

N = 40


def draw(**options) -> torch.Tensor:
    return build_mixing(Mixing(**options), N, torch.Generator().manual_seed(0)).double()


def test_none_is_zero():
    assert torch.equal(draw(kind="none"), torch.zeros(N, N, dtype=torch.float64))


def test_gaussian_is_asymmetric_with_unit_variance_and_zero_diagonal():
    m = build_mixing(Mixing(kind="gaussian"), 300, torch.Generator().manual_seed(0))
    off = m[~torch.eye(300, dtype=torch.bool)]
    assert torch.all(m.diagonal() == 0)
    assert not torch.allclose(m, m.T)
    # 89,700 N(0, 1) entries: the sample std is within 1% of 1 (its own std is ~0.24%).
    assert abs(off.std().item() - 1) < 0.01
    assert abs(off.mean().item()) < 0.01


def test_gaussian_symmetric_mirrors_the_upper_triangle():
    m = draw(kind="gaussian", symmetric=True)
    assert torch.equal(m, m.T)


def test_gaussian_keeps_the_diagonal_when_asked():
    assert torch.all(draw(kind="gaussian", zero_diagonal=False).diagonal() != 0)


@pytest.mark.parametrize("rank", [1, 3, 10])
def test_low_rank_has_the_requested_rank(rank):
    m = draw(kind="low_rank", rank=rank, zero_diagonal=False)
    assert torch.linalg.matrix_rank(m, rtol=1e-5).item() == rank  # float32 entries


def test_low_rank_tied_is_positive_semidefinite():
    m = draw(kind="low_rank", rank=5, tied=True, zero_diagonal=False)
    assert torch.allclose(m, m.T)
    assert torch.linalg.eigvalsh(m).min() > -1e-5


def test_flat_spectrum_has_equal_singular_values_and_unit_rms_entries():
    rank = 8
    m = draw(kind="low_rank", rank=rank, flat_spectrum=True, zero_diagonal=False)
    s = torch.linalg.svdvals(m)
    # Every one of the `rank` singular values is n / sqrt(rank); the rest are 0.
    assert torch.allclose(s[:rank], torch.full((rank,), N / math.sqrt(rank), dtype=s.dtype), rtol=1e-5)
    assert s[rank:].max() < 1e-4
    assert math.isclose(m.pow(2).mean().sqrt().item(), 1.0, rel_tol=1e-5)


def test_support_restricts_mixing_to_the_first_features():
    m = draw(kind="gaussian", support=10)
    assert m[:10, :10].abs().sum() > 0
    assert m[10:].abs().sum() == 0 and m[:, 10:].abs().sum() == 0


def test_embedding_mixing_is_identity_minus_gram_with_zero_diagonal():
    w = random_embedding(N, 1000, torch.Generator().manual_seed(1))
    assert torch.allclose(w.norm(dim=1), torch.ones(N), atol=1e-6)
    m = embedding_mixing(w).double()
    assert torch.allclose(m, torch.eye(N, dtype=torch.float64) - (w @ w.T).double(), atol=1e-6)
    assert m.diagonal().abs().max() < 1e-6
    # Off-diagonal entries are dot products of independent random unit vectors in 1000 dims:
    # standard deviation 1/sqrt(1000) = 0.0316; 1560 entries put the sample std within 10%.
    off = m[~torch.eye(N, dtype=torch.bool)]
    assert abs(off.std().item() * math.sqrt(1000) - 1) < 0.1


def test_same_seed_gives_the_same_matrix():
    spec = Mixing(kind="gaussian", symmetric=True)
    a = build_mixing(spec, N, torch.Generator().manual_seed(3))
    b = build_mixing(spec, N, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_effective_rank_of_identity_is_n_and_of_rank_one_is_one():
    assert math.isclose(effective_rank(torch.eye(7)).item(), 7, rel_tol=1e-5)
    v = torch.randn(7, 1)
    assert math.isclose(effective_rank(v @ v.T).item(), 1, rel_tol=1e-4)


def test_effective_rank_of_flat_spectrum_matches_its_rank():
    m = draw(kind="low_rank", rank=6, flat_spectrum=True, zero_diagonal=False)
    assert math.isclose(effective_rank(m).item(), 6, rel_tol=1e-3)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"kind": "bogus"}, "mixing.kind"),
        ({"kind": "low_rank"}, "mixing.rank"),
        ({"kind": "low_rank", "rank": N + 1}, "mixing.rank"),
        ({"kind": "low_rank", "rank": 0}, "mixing.rank"),
        ({"kind": "gaussian", "support": 0}, "mixing.support"),
        ({"kind": "embedding", "d_embed": 0}, "mixing.d_embed"),
    ],
)
def test_bad_options_name_their_field(options, field):
    with pytest.raises(ConfigError) as error:
        build_mixing(Mixing(**options), N, torch.Generator())
    assert error.value.field == field


def test_unknown_kind_message_lists_every_kind():
    with pytest.raises(ConfigError) as error:
        Mixing(kind="bogus").check(N)
    assert all(kind in str(error.value) for kind in MIXING_KINDS)
