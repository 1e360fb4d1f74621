"""Mixing matrices: each kind has the structure its definition promises."""

import math

import pytest
import torch

from cis_lightning import MIXING_KINDS, ConfigError, Mixing, build_mixing, effective_rank, embedding_mixing
from cis_lightning.core.mixing import random_embedding

N = 40


def draw(**options) -> torch.Tensor:
    return build_mixing(Mixing(**options), N, torch.Generator().manual_seed(0)).double()


def test_none_is_zero():
    assert torch.equal(draw(kind="none"), torch.zeros(N, N, dtype=torch.float64))


def test_gaussian_is_asymmetric_with_unit_variance_and_keeps_its_diagonal_by_default():
    """The authors' NoisyDataset keeps the diagonal; so does our default."""
    m = build_mixing(Mixing(kind="gaussian"), 300, torch.Generator().manual_seed(0))
    off = m[~torch.eye(300, dtype=torch.bool)]
    assert torch.all(m.diagonal() != 0)
    # 300 N(0, 1) diagonal entries: their sample std is within 15% of 1.
    assert abs(m.diagonal().std().item() - 1) < 0.15
    assert not torch.allclose(m, m.T)
    # 89,700 N(0, 1) entries: the sample std is within 1% of 1 (its own std is ~0.24%).
    assert abs(off.std().item() - 1) < 0.01
    assert abs(off.mean().item()) < 0.01


def test_gaussian_symmetric_mirrors_the_upper_triangle_with_its_diagonal():
    m = draw(kind="gaussian", symmetric=True)
    upper = build_mixing(Mixing(kind="gaussian"), N, torch.Generator().manual_seed(0)).double()
    assert torch.equal(m, m.T)
    assert torch.equal(torch.triu(m), torch.triu(upper))  # the upper triangle and diagonal of the same draw
    assert torch.all(m.diagonal() != 0)


@pytest.mark.parametrize("symmetric", [False, True])
def test_zero_diagonal_is_an_option(symmetric):
    kept = draw(kind="gaussian", symmetric=symmetric)
    zeroed = draw(kind="gaussian", symmetric=symmetric, zero_diagonal=True)
    assert torch.all(zeroed.diagonal() == 0)
    off = ~torch.eye(N, dtype=torch.bool)
    assert torch.equal(zeroed[off], kept[off])


@pytest.mark.parametrize("rank", [1, 3, 10])
def test_low_rank_has_the_requested_rank(rank):
    m = draw(kind="low_rank", rank=rank)
    assert torch.linalg.matrix_rank(m, rtol=1e-5).item() == rank  # float32 entries


def test_low_rank_is_u_v_transpose_without_normalisation():
    """M = U V^T of standard normal U, V (n, r): an entry is a sum of r unit-variance products."""
    rank = 50
    m = build_mixing(Mixing(kind="low_rank", rank=rank), 200, torch.Generator().manual_seed(0)).double()
    assert not torch.allclose(m, m.T)
    # 40,000 entries of variance r: the sample std is within 3% of sqrt(r).
    assert abs(m.std().item() / math.sqrt(rank) - 1) < 0.03


@pytest.mark.parametrize("rank", [3, 9])
def test_low_rank_effective_rank_is_near_its_rank_for_rank_much_below_n(rank):
    m = build_mixing(Mixing(kind="low_rank", rank=rank), 100, torch.Generator().manual_seed(0))
    # The entropy of r unequal singular values: at most r, and near it (Gaussian factors).
    assert 0.75 * rank < effective_rank(m).item() <= rank + 1e-3


def test_low_rank_above_n_is_full_rank_mixing_and_no_multiple_of_the_identity():
    """The authors' "full rank" r = 1000 > n = 100: a dense M whose diagonal carries a small share."""
    m = build_mixing(Mixing(kind="low_rank", rank=1000), 100, torch.Generator().manual_seed(0)).double()
    assert torch.linalg.matrix_rank(m).item() == 100
    scalar_part = m.diagonal().mean() * torch.eye(100, dtype=torch.float64)
    assert (m - scalar_part).norm() > 0.9 * m.norm()
    assert 60 < effective_rank(m).item() < 95  # the singular values of a square Gaussian matrix are far from flat


def test_low_rank_tied_is_positive_semidefinite():
    m = draw(kind="low_rank", rank=5, tied=True)
    assert torch.allclose(m, m.T)
    assert torch.linalg.eigvalsh(m).min() > -1e-4


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


def test_embedding_signs_are_negatives_of_each_other():
    ours = draw(kind="embedding", d_embed=200)
    authors = draw(kind="embedding", d_embed=200, embedding_sign="WWt-I")
    assert torch.equal(authors, -ours)
    assert Mixing(kind="embedding").describe() == "embedding(I-WWt)"
    assert Mixing(kind="embedding", embedding_sign="WWt-I").describe() == "embedding(WWt-I)"


def test_labels_say_every_option_that_changes_m():
    assert Mixing(kind="gaussian").describe() == "gaussian"
    assert Mixing(kind="gaussian", symmetric=True, zero_diagonal=True).describe() == "gaussian(sym,zero-diag)"
    assert Mixing(kind="low_rank", rank=9).describe() == "low_rank(r=9)"


def test_same_seed_gives_the_same_matrix():
    spec = Mixing(kind="gaussian", symmetric=True)
    a = build_mixing(spec, N, torch.Generator().manual_seed(3))
    b = build_mixing(spec, N, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_effective_rank_of_identity_is_n_and_of_rank_one_is_one():
    assert math.isclose(effective_rank(torch.eye(7)).item(), 7, rel_tol=1e-5)
    v = torch.randn(7, 1)
    assert math.isclose(effective_rank(v @ v.T).item(), 1, rel_tol=1e-4)


def test_effective_rank_of_equal_singular_values_is_their_count():
    q = torch.linalg.qr(torch.randn(N, N, generator=torch.Generator().manual_seed(0))).Q
    m = q[:, :6] @ q[:, 6:12].T * 3.0
    assert math.isclose(effective_rank(m).item(), 6, rel_tol=1e-3)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"kind": "bogus"}, "mixing.kind"),
        ({"kind": "low_rank"}, "mixing.rank"),
        ({"kind": "low_rank", "rank": 0}, "mixing.rank"),
        ({"kind": "gaussian", "support": 0}, "mixing.support"),
        ({"kind": "embedding", "d_embed": 0}, "mixing.d_embed"),
        ({"kind": "embedding", "embedding_sign": "WWt+I"}, "mixing.embedding_sign"),
        ({"kind": "gaussian", "seed": -1}, "mixing.seed"),
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
