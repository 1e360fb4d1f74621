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

from cis_lightning.errors import check_sizes, require
from cis_lightning.fused import accumulate_gradients
from cis_lightning.mixing import embedding_mixing, random_embedding
from cis_lightning.task import SparseInput, times

if TYPE_CHECKING:
    from cis_lightning.task import Task


def _uniform(generator: torch.Generator, shape: tuple[int, ...], bound: float) -> Tensor:
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def _instance_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    require(len(seeds) > 0, "model.seeds", "needs at least one seed (one per instance)")
    return seeds


class CCModel(nn.Module):
    """What the training and analysis code may rely on, whatever the model.

    - forward(x): (K, B, n) -> (K, B, n)
    - effective_weights(): (W_in (K, h, n), W_out (K, n, h)) in feature space
    - effective_mixing(): (K, n, n), the mixing matrix the model itself adds (0 for an MLP)
    - residual: whether the labels include x (a residual stream carries the input to the output)
    - every parameter has the instance axis first (K, ...): per-instance schedules scale updates along it
    - fit_to(task): called by the LightningModule's setup once the task (M_k, p_k) is known, before
      any stage; hand-made baselines (`cis_lightning.baselines`) build their weights there
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

    # The readout form, y_hat = x L^T + H(x) W^T + b, lets the loss skip the dense (B, n) output
    # (`evaluation.per_sample_loss`). Models that have it say so with has_readout_form.
    @property
    def has_readout_form(self) -> bool:
        """Whether forward(x) == x skip()^T + hidden(x) readout()[0]^T + readout()[1]."""
        return False

    def hidden(self, x: Tensor | SparseInput) -> Tensor:
        """All ReLU activations H(x) (K, B, m) for x (K, B, n), dense or sparse."""
        raise NotImplementedError

    def readout(self) -> tuple[Tensor, Tensor | None]:
        """W (K, n, m) from the activations to the output, and the output bias b (K, 1, n) or None."""
        raise NotImplementedError

    def hidden_weight(self) -> Tensor | None:
        """A (K, m, n) when hidden(x) == ReLU(x A^T) (one layer, no bias), else None.

        The training loss then runs through `fused.one_layer_loss`, whose backward is written out.
        """
        return None

    def one_layer_backward(self, grad_a: Tensor | None, grad_w: Tensor | None) -> None:
        """Add to the parameters' gradients what hidden_weight() and readout()[0] pass back when they
        receive grad_a and grad_w (None: nothing), as autograd would (`evaluation.mean_loss_eager`).

        By default through autograd, from the two made anew (in one backward, so that a parameter
        in both, like a tied MLP's, sums its two parts as autograd does); models override it."""
        with torch.enable_grad():
            weights = (self.hidden_weight(), self.readout()[0])
        kept = [i for i, grad in enumerate((grad_a, grad_w)) if grad is not None and weights[i].requires_grad]
        if kept:
            torch.autograd.backward([weights[i] for i in kept], [(grad_a, grad_w)[i] for i in kept])

    def kept_label_map(self) -> Tensor | None:
        """(I if residual) - skip() (K, n, n), the labels' linear part when the task mixes nothing in,
        if the model keeps it between steps (it is fixed); None: `evaluation._label_map` makes it."""
        return None

    def skip(self) -> Tensor | None:
        """L (K, n, n), the linear path from input to output, or None."""
        return None


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

    @property
    def has_readout_form(self) -> bool:
        return type(self).forward is MLP.forward  # a subclass with its own forward must say so itself

    def hidden(self, x: Tensor | SparseInput) -> Tensor:
        pre = times(x, self.effective_weights()[0])  # (K, B, h)
        return torch.relu(pre if self.b_hidden is None else pre + self.b_hidden)

    def readout(self) -> tuple[Tensor, Tensor | None]:
        return self.effective_weights()[1], self.b_out

    def hidden_weight(self) -> Tensor | None:
        return self.effective_weights()[0] if self.b_hidden is None else None

    def one_layer_backward(self, grad_a: Tensor | None, grad_w: Tensor | None) -> None:
        if self.tied:  # W_out = W_in^T: both gradients go to W_in (autograd adds them)
            return super().one_layer_backward(grad_a, grad_w)
        accumulate_gradients((self.w_in, self.w_out), (grad_a, grad_w))

    def forward(self, x: Tensor) -> Tensor:
        w_in, w_out = self.effective_weights()
        pre = torch.bmm(x, w_in.transpose(1, 2))  # (K, B, h)
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
        # G = W_E W_E^T (K, n, n) costs n^2 D per instance: made once, and again whenever W_E is
        # loaded or converted (a float32 G cast to float64 would not be W_E W_E^T in float64).
        # The labels' linear part without mixing, I - G (`kept_label_map`), is kept with G: as the
        # transpose of a dense array, so that the C path reads R^T as it is.
        self.register_buffer("embed_gram", None, persistent=False)
        self.register_buffer("_label_map_t", None, persistent=False)
        self._refresh_gram(self)
        self.register_load_state_dict_post_hook(ResidualMLP._refresh_gram)

    @staticmethod
    def _refresh_gram(module: ResidualMLP, incompatible_keys=None) -> None:
        with torch.no_grad():
            w_e = module.w_embed
            module.embed_gram = w_e @ w_e.transpose(1, 2)
            eye = torch.eye(module.n_features, device=w_e.device, dtype=w_e.dtype)
            module._label_map_t = (eye - module.embed_gram).transpose(1, 2).contiguous()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._refresh_gram(self)
        return self

    @property
    def n_neurons(self) -> int:
        return self.d_mlp * self.n_layers

    @property
    def homogeneous(self) -> bool:
        return True

    def forward(self, x: Tensor) -> Tensor:
        w_e = self.w_embed
        a = self.w_in @ w_e[:, None].transpose(-1, -2)  # (K, L, h, n)
        b = w_e[:, None] @ self.w_out  # (K, L, n, h)
        y = torch.bmm(x, self.embed_gram)  # W_E W_E^T is symmetric
        hidden: list[Tensor] = []
        for layer in range(self.n_layers):
            pre = torch.bmm(x, a[:, layer].transpose(1, 2))
            for j, h_j in enumerate(hidden):
                c = self.w_in[:, layer] @ self.w_out[:, j]  # (K, h, h)
                pre = pre + torch.bmm(h_j, c.transpose(1, 2))
            hidden.append(torch.relu(pre))
            y = y + torch.bmm(hidden[-1], b[:, layer].transpose(1, 2))
        return y

    @property
    def has_readout_form(self) -> bool:
        return type(self).forward is ResidualMLP.forward

    def hidden(self, x: Tensor | SparseInput) -> Tensor:
        """[h_1, ..., h_L] (K, B, L h): h_l = ReLU(A_l x + sum_{j<l} C_lj h_j), as in `forward`."""
        a = self.w_in @ self.w_embed[:, None].transpose(-1, -2)  # (K, L, h, n)
        hidden: list[Tensor] = []
        for layer in range(self.n_layers):
            pre = times(x, a[:, layer])
            for j, h_j in enumerate(hidden):
                pre = pre + torch.bmm(h_j, (self.w_in[:, layer] @ self.w_out[:, j]).transpose(1, 2))
            hidden.append(torch.relu(pre))
        return torch.cat(hidden, dim=-1)

    def readout(self) -> tuple[Tensor, None]:
        """[B_1, ..., B_L] (K, n, L h), B_l = W_E W_out_l."""
        k, n = self.n_instances, self.n_features
        if self.n_layers == 1:  # one batched product, no broadcast over layers
            return torch.bmm(self.w_embed, self.w_out.flatten(1, 2)), None
        return (self.w_embed[:, None] @ self.w_out).permute(0, 2, 1, 3).reshape(k, n, -1), None

    def hidden_weight(self) -> Tensor | None:
        # flatten, not [:, 0]: the gradient of a view is a view, that of a select a new zero tensor.
        return torch.bmm(self.w_in.flatten(1, 2), self.w_embed.transpose(1, 2)) if self.n_layers == 1 else None

    def one_layer_backward(self, grad_a: Tensor | None, grad_w: Tensor | None) -> None:
        # A = W_in W_E^T and W = W_E W_out (one layer; `hidden_weight`, `readout`): autograd's
        # backward of the two products, the same calls.
        with torch.no_grad():
            grad_in = None if grad_a is None else torch.bmm(grad_a, self.w_embed).view_as(self.w_in)
            grad_out = None if grad_w is None else torch.bmm(self.w_embed.transpose(1, 2), grad_w).view_as(self.w_out)
        accumulate_gradients((self.w_in, self.w_out), (grad_in, grad_out))

    def skip(self) -> Tensor:
        return self.embed_gram

    def kept_label_map(self) -> Tensor:
        return self._label_map_t.transpose(1, 2)  # I - G, the values `evaluation._label_map` would make

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
