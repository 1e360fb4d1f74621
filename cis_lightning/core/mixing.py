"""Mixing matrices M: the structured noise that the labels ReLU(x) + sigma * M x carry.

Bhagat et al. (2026, arXiv 2606.14673) show that the residual stream of Braun et al.'s model adds
exactly such a term, with M = I - W_E W_E^T, and that the trained model's advantage over the naive
solution comes from it. Everything that needs M asks `build_mixing`.

Conventions (column form, y = M x for one sample x of shape (n,)), following the authors' public
code (`paper_code/mlpinsoup.py`, `NoisyDataset`) unless noted:
- gaussian: M_ij ~ N(0, 1) with the diagonal kept (the authors' experiments; `zero_diagonal` is an
  option); symmetric mirrors the upper triangle, diagonal included.
- low_rank: M = U V^T with U, V (n, rank) standard normal and not normalised, so an entry has
  variance `rank`; rank may exceed n (the authors' "full rank" is rank 1000 for n = 100). The
  effective rank of such an M is well below its nominal rank: measure it (`effective_rank`).
- embedding: M = I - W_E W_E^T with W_E (n, d_embed) unit-norm Gaussian rows: the residual model's
  own mixing matrix (derivation in docs/derivation.md). The authors' public code builds the other
  sign, W_E W_E^T - I (`embedding_sign: WWt-I`); with sigma = 1 the two differ in every off-diagonal
  entry's sign, and so in which eigenvectors are on top.
- none: M = 0.
sigma multiplies M outside this module; sigma = 1 with the embedding kind is the residual model.
Every matrix is drawn from `seed` (the instance's data seed unless the mixing sets its own).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

import torch
from torch import Tensor

from cis_lightning.core.errors import require

MixingKind = Literal["none", "gaussian", "low_rank", "embedding"]
MIXING_KINDS: tuple[str, ...] = get_args(MixingKind)
EmbeddingSign = Literal["I-WWt", "WWt-I"]
EMBEDDING_SIGNS: tuple[str, ...] = get_args(EmbeddingSign)


@dataclasses.dataclass(frozen=True)
class Mixing:
    """Which mixing matrix to draw. Options apply to the kinds named in their comment."""

    kind: MixingKind = "none"
    symmetric: bool = False  # gaussian, low_rank: mirror the upper triangle
    zero_diagonal: bool = False  # gaussian, low_rank: M_ii = 0 (the authors keep the diagonal)
    rank: int | None = None  # low_rank: required, any integer >= 1 (may exceed n_features)
    tied: bool = False  # low_rank: U = V (symmetric positive semi-definite)
    normalize_rows: bool = False  # low_rank: rows of U and V scaled to unit norm before M = U V^T
    support: int | None = None  # gaussian, low_rank: only the first `support` features mix
    d_embed: int = 1000  # embedding: width of the random embedding
    embedding_sign: EmbeddingSign = "I-WWt"  # embedding: I - W_E W_E^T (the residual model's) or its negative
    seed: int | None = None  # the seed M is drawn from; None: the instance's data seed

    def check(self, n_features: int, field: str = "mixing") -> None:
        """Raise ConfigError naming the first bad option."""
        require(
            self.kind in MIXING_KINDS,
            f"{field}.kind",
            f"unknown mixing kind {self.kind!r}; allowed: {', '.join(MIXING_KINDS)}",
        )
        if self.kind == "low_rank":
            require(
                isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1,
                f"{field}.rank",
                f"must be an integer >= 1 for low_rank mixing, got {self.rank}",
            )
        require(
            self.support is None or 1 <= self.support <= n_features,
            f"{field}.support",
            f"must be null or an integer in [1, n_features={n_features}], got {self.support}",
        )
        require(self.d_embed >= 1, f"{field}.d_embed", f"must be a positive integer, got {self.d_embed}")
        require(
            self.embedding_sign in EMBEDDING_SIGNS,
            f"{field}.embedding_sign",
            f"must be one of {', '.join(EMBEDDING_SIGNS)}, got {self.embedding_sign!r}",
        )
        require(
            self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**62),
            f"{field}.seed",
            f"must be null (the data seed) or an integer in [0, 2^62), got {self.seed}",
        )

    def describe(self) -> str:
        """Short label for tables and legends, e.g. 'gaussian(sym)', 'low_rank(r=9)', 'embedding(WWt-I)'."""
        flags = []
        if self.kind in ("gaussian", "low_rank"):
            flags += [name for name, on in (("sym", self.symmetric), ("zero-diag", self.zero_diagonal)) if on]
        if self.kind == "low_rank":
            flags.append(f"r={self.rank}")
            flags += [name for name, on in (("tied", self.tied), ("unit-rows", self.normalize_rows)) if on]
        if self.kind == "embedding":
            flags.append(self.embedding_sign)
            if self.d_embed != 1000:
                flags.append(f"d={self.d_embed}")
        return f"{self.kind}({','.join(flags)})" if flags else self.kind


def random_embedding(n_features: int, d_embed: int, generator: torch.Generator) -> Tensor:
    """W_E (n_features, d_embed): Gaussian rows normalised to unit norm (Braun et al. 2025)."""
    w = torch.randn(n_features, d_embed, generator=generator, dtype=torch.float64)
    return (w / w.norm(dim=1, keepdim=True)).float()


def embedding_mixing(w_embed: Tensor) -> Tensor:
    """M = I - W_E W_E^T for W_E (..., n, d_embed): the residual model's mixing matrix."""
    n = w_embed.shape[-2]
    eye = torch.eye(n, dtype=w_embed.dtype, device=w_embed.device)
    return eye - w_embed @ w_embed.transpose(-1, -2)


def build_mixing(spec: Mixing, n_features: int, generator: torch.Generator) -> Tensor:
    """Draw the (n_features, n_features) mixing matrix described by `spec`, before sigma."""
    spec.check(n_features)
    n = spec.support or n_features
    if spec.kind == "none":
        return torch.zeros(n_features, n_features)
    if spec.kind == "embedding":
        m = embedding_mixing(random_embedding(n_features, spec.d_embed, generator))
        return m if spec.embedding_sign == "I-WWt" else -m
    if spec.kind == "gaussian":
        block = torch.randn(n, n, generator=generator, dtype=torch.float64)
    else:
        u = torch.randn(n, spec.rank, generator=generator, dtype=torch.float64)
        v = u if spec.tied else torch.randn(n, spec.rank, generator=generator, dtype=torch.float64)
        if spec.normalize_rows:
            u, v = (f / f.norm(dim=1, keepdim=True) for f in (u, v))
        block = u @ v.T
    if spec.symmetric:
        block = torch.triu(block) + torch.triu(block, diagonal=1).T
    if spec.zero_diagonal:
        block.fill_diagonal_(0.0)
    m = torch.zeros(n_features, n_features, dtype=torch.float64)
    m[:n, :n] = block
    return m.float()


def effective_rank(m: Tensor) -> Tensor:
    """exp(entropy of the normalised singular values) of M (..., n, n) (Roy and Vetterli 2007)."""
    s = torch.linalg.svdvals(m.double())
    q = s / s.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    entropy = -(q * torch.log(q.clamp_min(torch.finfo(torch.float64).tiny))).sum(dim=-1)
    return entropy.exp().to(m.dtype)
