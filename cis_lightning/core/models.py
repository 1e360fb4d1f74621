"""The two compressed-computation models, K independent instances each, in pure torch.

Shapes: K instances, B samples, n features, h = d_mlp neurons, D = d_embed. Inputs and outputs are
rows (K, B, n); weights keep the paper's column form, y = W_out ReLU(W_in x): W_in (K, h, n),
W_out (K, n, h). Every instance k is initialised from its own seed, so instance k of a K-model
equals a one-instance model with that seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from cis_lightning.core.errors import check_sizes, require
from cis_lightning.core.mixing import embedding_mixing, random_embedding
from cis_lightning.core.task import SparseInput, times

if TYPE_CHECKING:
    from cis_lightning.core.task import Task


def _uniform(generator: torch.Generator, shape: tuple[int, ...], bound: float) -> Tensor:
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def _instance_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    require(len(seeds) > 0, "model.seeds", "needs at least one seed (one per instance)")
    return seeds


class CCModel(nn.Module):
    """What the training and analysis code may rely on, whatever the model.

    - forward(x): (K, B, n) -> (K, B, n), x dense or a SparseInput; the training loss differentiates it
    - effective_weights(): (W_in (K, h, n), W_out (K, n, h)) in feature space
    - effective_mixing(): (K, n, n), the mixing matrix the model itself adds (0 for an MLP)
    - residual: whether the labels include x (a residual stream carries the input to the output)
    - every parameter has the instance axis first (K, ...): per-instance schedules scale updates along it
    - fit_to(task): called by the LightningModule's setup once the task (M_k, p_k) is known, before
      any stage; hand-made baselines (`cis_lightning.core.baselines`) build their weights there
    - describe_instance(k): extra results.csv columns for instance k (e.g. a baseline's fitted offset)
    """

    residual: ClassVar[bool] = False
    n_features: int
    n_instances: int

    @property
    def n_neurons(self) -> int:
        """ReLU neurons per instance (all layers): the naive model represents this many features."""
        raise NotImplementedError

    def effective_weights(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def effective_mixing(self) -> Tensor:
        k, n = self.n_instances, self.n_features
        return torch.zeros(k, n, n, device=self.effective_weights()[0].device)

    def fit_to(self, task: Task) -> None:
        """Adapt to the task before any stage; trained models need nothing."""

    def describe_instance(self, k: int) -> dict[str, float]:
        return {}

    @property
    def homogeneous(self) -> bool:
        """f(a x) = a f(x) for a >= 0 (no biases): single-feature losses have a closed form."""
        return False


class MLP(CCModel):
    """Bhagat et al.'s simplified model y = W_out ReLU(W_in x + b_hidden) + b_out.

    Trained on ReLU(x) + sigma M x. Biases are off by default; `tied` sets W_out = W_in^T.
    Init as in the paper's code (torch's Kaiming-uniform on their (n, h) and (h, n) weights):
    W_in ~ U(+-sqrt(6 / h)), W_out ~ U(+-sqrt(6 / n)).
    """

    def __init__(
        self,
        n_features: int = 100,
        d_mlp: int = 50,
        seeds: Sequence[int] = (0,),
        hidden_bias: bool = False,
        output_bias: bool = False,
        tied: bool = False,
    ):
        super().__init__()
        check_sizes(**{"model.n_features": n_features, "model.d_mlp": d_mlp})
        seeds = _instance_seeds(seeds)
        self.n_features, self.d_mlp, self.n_instances, self.tied = n_features, d_mlp, len(seeds), tied
        w_in, w_out = [], []
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            w_in.append(_uniform(g, (d_mlp, n_features), math.sqrt(6 / d_mlp)))
            w_out.append(_uniform(g, (n_features, d_mlp), math.sqrt(6 / n_features)))
        self.w_in = nn.Parameter(torch.stack(w_in))
        self.w_out = None if tied else nn.Parameter(torch.stack(w_out))
        k = len(seeds)
        self.b_hidden = nn.Parameter(torch.zeros(k, 1, d_mlp)) if hidden_bias else None
        self.b_out = nn.Parameter(torch.zeros(k, 1, n_features)) if output_bias else None

    @property
    def n_neurons(self) -> int:
        return self.d_mlp

    @property
    def homogeneous(self) -> bool:
        """f(a x) = a f(x) for a >= 0: true without biases (closed-form single-feature losses)."""
        return self.b_hidden is None and self.b_out is None

    def effective_weights(self) -> tuple[Tensor, Tensor]:
        w_out = self.w_in.transpose(1, 2) if self.tied else self.w_out
        return self.w_in, w_out

    def forward(self, x: Tensor | SparseInput) -> Tensor:
        w_in, w_out = self.effective_weights()
        pre = times(x, w_in)  # W_in x (K, B, h); a sparse x as an embedding bag over its active entries
        if self.b_hidden is not None:
            pre = pre + self.b_hidden
        y = torch.bmm(torch.relu(pre), w_out.transpose(1, 2))  # (K, B, n)
        return y if self.b_out is None else y + self.b_out


class ResidualMLP(CCModel):
    """Braun et al.'s residual MLP: r = W_E^T x; r <- r + W_out ReLU(W_in r) per layer; y = W_E r.

    W_E (K, n, D) has unit-norm Gaussian rows and is frozen (a buffer, saved in the state dict);
    layer weights W_in (K, L, h, D), W_out (K, L, D, h), no biases, nn.Linear's Kaiming-uniform
    bounds 1/sqrt(fan_in). Trained on x + ReLU(x).

    `forward` folds the embedding into feature space, which is the same function at a fraction of
    the cost (D = 1000 >> n, h): with A_l = W_in_l W_E^T, B_l = W_E W_out_l, C_lj = W_in_l W_out_j,
    h_l = ReLU(A_l x + sum_{j<l} C_lj h_j) and y = W_E W_E^T x + sum_l B_l h_l.
    `forward_direct` is the literal residual-stream computation.
    """

    residual: ClassVar[bool] = True

    def __init__(
        self,
        n_features: int = 100,
        d_embed: int = 1000,
        d_mlp: int = 50,
        n_layers: int = 1,
        seeds: Sequence[int] = (0,),
    ):
        super().__init__()
        check_sizes(
            **{
                "model.n_features": n_features,
                "model.d_embed": d_embed,
                "model.d_mlp": d_mlp,
                "model.n_layers": n_layers,
            }
        )
        seeds = _instance_seeds(seeds)
        self.n_features, self.d_embed, self.d_mlp, self.n_layers = n_features, d_embed, d_mlp, n_layers
        self.n_instances = len(seeds)
        w_embed, w_in, w_out = [], [], []
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            w_embed.append(random_embedding(n_features, d_embed, g))
            w_in.append(_uniform(g, (n_layers, d_mlp, d_embed), 1 / math.sqrt(d_embed)))
            w_out.append(_uniform(g, (n_layers, d_embed, d_mlp), 1 / math.sqrt(d_mlp)))
        self.register_buffer("w_embed", torch.stack(w_embed))
        self.w_in = nn.Parameter(torch.stack(w_in))
        self.w_out = nn.Parameter(torch.stack(w_out))
        # G = W_E W_E^T (K, n, n) costs n^2 D per instance: kept (`gram`) for the W_E it was made
        # from, and made again when W_E is replaced (a cast or a move: a float32 G cast to float64
        # would not be W_E W_E^T in float64) or loaded.
        self.register_buffer("embed_gram", None, persistent=False)
        self._gram_of: Tensor | None = None  # the W_E tensor that embed_gram was made from
        self.gram()
        self.register_load_state_dict_post_hook(ResidualMLP._forget_gram)

    @staticmethod
    def _forget_gram(module: ResidualMLP, incompatible_keys=None) -> None:
        module._gram_of = None  # load_state_dict copies into W_E in place

    def gram(self) -> Tensor:
        """G = W_E W_E^T (K, n, n), symmetric, made again whenever W_E changed."""
        if self._gram_of is not self.w_embed:
            with torch.no_grad():
                self.embed_gram = torch.bmm(self.w_embed, self.w_embed.transpose(1, 2))
            self._gram_of = self.w_embed
        return self.embed_gram

    @property
    def n_neurons(self) -> int:
        return self.d_mlp * self.n_layers

    @property
    def homogeneous(self) -> bool:
        return True

    def forward(self, x: Tensor | SparseInput) -> Tensor:
        w_e = self.w_embed
        a = self.w_in @ w_e[:, None].transpose(-1, -2)  # (K, L, h, n)
        b = w_e[:, None] @ self.w_out  # (K, L, n, h)
        y = times(x, self.gram())  # W_E W_E^T x (G is symmetric)
        hidden: list[Tensor] = []
        for layer in range(self.n_layers):
            pre = times(x, a[:, layer])
            for j, h_j in enumerate(hidden):
                c = self.w_in[:, layer] @ self.w_out[:, j]  # (K, h, h)
                pre = pre + torch.bmm(h_j, c.transpose(1, 2))
            hidden.append(torch.relu(pre))
            y = y + torch.bmm(hidden[-1], b[:, layer].transpose(1, 2))
        return y

    def forward_direct(self, x: Tensor) -> Tensor:
        """The residual stream as written by Braun et al., in d_embed dimensions."""
        r = torch.bmm(x, self.w_embed)  # (K, B, D)
        for layer in range(self.n_layers):
            hidden = torch.relu(torch.bmm(r, self.w_in[:, layer].transpose(1, 2)))
            r = r + torch.bmm(hidden, self.w_out[:, layer].transpose(1, 2))
        return torch.bmm(r, self.w_embed.transpose(1, 2))

    def effective_weights(self) -> tuple[Tensor, Tensor]:
        """Per-layer feature-space weights stacked on the neuron axis: W_in W_E^T and W_E W_out.

        Exact for one layer (the model is then an MLP with these weights plus W_E W_E^T x); for
        deeper models the layer-to-layer paths C_lj are left out.
        """
        k, n = self.n_instances, self.n_features
        w_in = self.w_in @ self.w_embed[:, None].transpose(-1, -2)  # (K, L, h, n)
        w_out = self.w_embed[:, None] @ self.w_out  # (K, L, n, h)
        return w_in.reshape(k, -1, n), w_out.permute(0, 2, 1, 3).reshape(k, n, -1)

    def effective_mixing(self) -> Tensor:
        """I - W_E W_E^T: the residual model's error against x + ReLU(x) equals the error of the MLP
        (effective_weights) against ReLU(x) + (I - W_E W_E^T) x."""
        return embedding_mixing(self.w_embed)
