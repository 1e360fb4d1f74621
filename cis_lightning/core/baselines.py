"""Hand-made baselines: one-layer ReLU MLPs whose weights are built from the task, not trained.

Each is a CCModel, selectable as `model.network.class_path` (Zero, Naive, NaiveOffset, SVD, SemiNMF),
so `cis test --config X.yaml` evaluates it on exactly the batches a trained model is tested on.
The weights are buffers (nothing to train), built per instance in `fit_to(task)`, which the
LightningModule calls in setup once the task is known. Shapes as in `models`: W_in (K, h, n),
W_out (K, n, h), y = W_out ReLU(W_in x); the target's linear part is A_k = I + sigma_k M_k.
Pure torch, no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from cis_lightning.core.errors import check_sizes, require
from cis_lightning.core.models import CCModel, _instance_seeds
from cis_lightning.core.task import Stream, Task, samples_for


class Baseline(CCModel):
    """A bias-free MLP y = W_out ReLU(W_in x) with weights set by `build(task)` (no parameters)."""

    def __init__(self, n_features: int = 100, d_mlp: int = 50, seeds: Sequence[int] = (0,)):
        super().__init__()
        check_sizes(**{"model.n_features": n_features, "model.d_mlp": d_mlp})
        self.n_features, self.d_mlp = n_features, d_mlp
        self.n_instances = len(_instance_seeds(seeds))
        k = self.n_instances
        self.register_buffer("w_in", torch.zeros(k, d_mlp, n_features))
        self.register_buffer("w_out", torch.zeros(k, n_features, d_mlp))

    @property
    def n_neurons(self) -> int:
        return self.d_mlp

    @property
    def homogeneous(self) -> bool:
        return True

    def effective_weights(self) -> tuple[Tensor, Tensor]:
        return self.w_in, self.w_out

    def forward(self, x: Tensor) -> Tensor:
        hidden = torch.relu(torch.bmm(x, self.w_in.transpose(1, 2)))  # (K, B, h)
        return torch.bmm(hidden, self.w_out.transpose(1, 2))

    @torch.no_grad()
    def fit_to(self, task: Task) -> None:
        w_in, w_out = self.build(task)
        self.w_in.copy_(w_in)
        self.w_out.copy_(w_out)

    def build(self, task: Task) -> tuple[Tensor, Tensor]:
        """(W_in (K, h, n), W_out (K, n, h)) for the task's instances."""
        raise NotImplementedError

    def _naive(self) -> tuple[Tensor, Tensor]:
        """Neuron i reads and writes feature i for i < min(h, n): ReLU(x_i) exactly, the rest 0."""
        k, h, n = self.n_instances, self.d_mlp, self.n_features
        eye = torch.eye(h, n, device=self.w_in.device).expand(k, h, n)
        return eye.clone(), eye.transpose(1, 2).clone()


class Zero(Baseline):
    """y = 0. L / p = 1/6 on clean labels: every active feature costs E[ReLU(x)^2] = 1/6."""

    def build(self, task: Task) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(self.w_in), torch.zeros_like(self.w_out)


class Naive(Baseline):
    """The first d_mlp features get one neuron each (identity), the others output 0.

    On clean labels L / p = (n - d_mlp) / n / 6 (`evaluation.naive_loss_per_feature`).
    """

    def build(self, task: Task) -> tuple[Tensor, Tensor]:
        return self._naive()


def offset_grid() -> Tensor:
    """The offsets the scan tries: 0 and 200 log-spaced values in [1e-3, 1e-1] (float64)."""
    return torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-3, -1, 200, dtype=torch.float64)])


@torch.no_grad()
def offset_scan(
    task: Task, d_mlp: int, n_nonempty: int = 20_000, batch_size: int = 16384, min_relative_gain: float = 1e-3
) -> tuple[Tensor, Tensor]:
    """Best offset b_k per instance on `offset_grid()`, and L / p at every grid point (K, G).

    The naive model plus b from every neuron to every unrepresented feature j >= h outputs
    y_hat_j = b S, S = sum_{i<h} ReLU(x_i). The loss is exactly quadratic in b,
    L(b) = E[|r|^2 + 2 b S sum_{j>=h} r_j + b^2 S^2 (n - h)] / n with r = y_naive - y, so its three
    moments, estimated once on the ANALYSIS stream (disjoint from test data), give L at every b.
    On clean labels the optimum is b* = p / (8/3 + (h - 1) p) (1/(8/3 + 49) = 0.0194 at p = 1 for
    h = 50), and it gains (n - h)/n (h p^2/16)^2 / E[S^2] / p in L / p, E[S^2] = h p/6 + h (h-1) p^2/16:
    36% of the naive loss at p = 1, 2.5% at p = 0.1, 0.06% at p = 0.01, 0.0007% at p = 0.001. A gain
    below `min_relative_gain` of L(0) (0.1%, about what an evaluation on 10^6 non-empty samples can
    resolve) is no gain: the scan then returns b = 0, so p <= 0.01 gets no offset.
    """
    n, h = task.n_features, d_mlp
    ps = [i.feature_probability for i in task.instances]
    n_batches = math.ceil(samples_for(n_nonempty, task, ps) / batch_size)
    moments = torch.zeros(3, task.n_instances, dtype=torch.float64, device=task.mixing.device)
    for step in range(n_batches):
        x = task.sample(batch_size, step, Stream.ANALYSIS)
        y = task.labels(x)
        relu = torch.relu(x)
        residual = torch.cat([relu[..., :h], torch.zeros_like(relu[..., h:])], dim=-1) - y  # naive output - y
        s = relu[..., :h].sum(-1)  # (K, B)
        moments[0] += residual.double().pow(2).sum((1, 2))
        moments[1] += (s * residual[..., h:].sum(-1)).double().sum(1)
        moments[2] += s.double().pow(2).sum(1) * (n - h)
    b = offset_grid().to(moments.device)
    count = n_batches * batch_size * n
    loss = (moments[0, :, None] + 2 * b * moments[1, :, None] + b**2 * moments[2, :, None]) / count
    p = torch.tensor(ps, dtype=torch.float64, device=loss.device)[:, None]
    lpf = loss / p
    best = lpf.argmin(dim=1)
    gain = lpf[:, 0] - lpf.gather(1, best[:, None])[:, 0]
    return torch.where(gain > min_relative_gain * lpf[:, 0], b[best], 0.0), lpf


class NaiveOffset(Baseline):
    """Naive plus a constant offset b_k in W_out from every neuron to each unrepresented feature.

    `offset`: a fixed b for every instance, or None to find each instance's best b with
    `offset_scan` (on the instance's own p and M, `scan_nonempty_samples` non-empty samples).
    """

    def __init__(
        self,
        n_features: int = 100,
        d_mlp: int = 50,
        seeds: Sequence[int] = (0,),
        offset: float | None = None,
        scan_nonempty_samples: int = 20_000,
    ):
        super().__init__(n_features, d_mlp, seeds)
        field = "model.network.init_args.offset"
        require(offset is None or math.isfinite(offset), field, f"must be a number or null, got {offset}")
        check_sizes(**{"model.network.init_args.scan_nonempty_samples": scan_nonempty_samples})
        self.offset, self.scan_nonempty_samples = offset, scan_nonempty_samples
        self.register_buffer("offsets", torch.zeros(self.n_instances))

    def build(self, task: Task) -> tuple[Tensor, Tensor]:
        if self.offset is None:
            best, _ = offset_scan(task, self.d_mlp, self.scan_nonempty_samples)
        else:
            best = torch.full((self.n_instances,), float(self.offset))
        self.offsets.copy_(best)
        w_in, w_out = self._naive()
        w_out[:, self.d_mlp :, :] = self.offsets.to(w_out)[:, None, None]
        return w_in, w_out

    def describe_instance(self, k: int) -> dict[str, float]:
        return {"offset": float(self.offsets[k])}


def target_matrix(task: Task) -> Tensor:
    """A_k = I + sigma_k M_k (K, n, n) in float64: the linear part of the labels for x >= 0."""
    eye = torch.eye(task.n_features, dtype=torch.float64, device=task.mixing.device)
    return eye + task.scaled_mixing().detach().double()


Orientation = Literal["direct", "authors"]
ORIENTATIONS: tuple[str, ...] = get_args(Orientation)


def oriented_target(task: Task, orientation: Orientation) -> Tensor:
    """The matrix a factor baseline implements: A = I + sigma M ("direct"), or A^T = I + sigma M^T ("authors").

    The authors' code stores a factorisation A ~ U V as w_in = U, w_out = V of a row-convention MLP
    (x @ w_in @ w_out), which computes (U V)^T x: their SVD and semi-NMF models implement I + sigma M^T
    (`paper_code/nb3_svd_nmf.py`, `nb8_test_baselines.py`). For a symmetric M the two agree; for an
    asymmetric M only "direct" matches the labels ReLU(x) + sigma M x.
    """
    target = target_matrix(task)
    return target if orientation == "direct" else target.transpose(1, 2).contiguous()


class FactorBaseline(Baseline):
    """A baseline whose W_out W_in is a factorisation of `oriented_target` (SVD, semi-NMF)."""

    def __init__(
        self, n_features: int = 100, d_mlp: int = 50, seeds: Sequence[int] = (0,), orientation: Orientation = "direct"
    ):
        super().__init__(n_features, d_mlp, seeds)
        require(
            orientation in ORIENTATIONS,
            "model.network.init_args.orientation",
            f"must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}",
        )
        self.orientation = orientation

    def describe_instance(self, k: int) -> dict:
        return {"orientation": self.orientation}


def flip_to_positive(w_in: Tensor, w_out: Tensor) -> tuple[Tensor, Tensor]:
    """Flip neuron i (row i of W_in, column i of W_out) where its largest-magnitude input weight is negative.

    W_out W_in is unchanged; the ReLU then passes each neuron's main feature when it is positive.
    """
    largest = w_in.gather(2, w_in.abs().argmax(dim=2, keepdim=True))  # (K, h, 1)
    sign = torch.where(largest < 0, -1.0, 1.0).to(w_in)
    return w_in * sign, w_out * sign.transpose(1, 2)


def svd_factors(target: Tensor, d_mlp: int) -> tuple[Tensor, Tensor]:
    """Rank-d_mlp SVD truncation A ~ U_h (S_h V_h^T), signs flipped by `flip_to_positive`: (W_in, W_out)."""
    u, s, vh = torch.linalg.svd(target)
    return flip_to_positive(s[:, :d_mlp, None] * vh[:, :d_mlp], u[:, :, :d_mlp])


class SVD(FactorBaseline):
    """W_out W_in = the rank-d_mlp SVD truncation of `oriented_target` (I + sigma M by default), with the
    signs of `flip_to_positive`."""

    def build(self, task: Task) -> tuple[Tensor, Tensor]:
        w_in, w_out = svd_factors(oriented_target(task, self.orientation), self.d_mlp)
        return w_in.float(), w_out.float()


def _output_weights(w_in: Tensor, target: Tensor) -> Tensor:
    """argmin_W |A - W W_in|_F = A W_in^T (W_in W_in^T)^-1 (a tiny ridge keeps dead neurons solvable): (K, n, h)."""
    gram = w_in @ w_in.transpose(1, 2)  # (K, h, h)
    ridge = 1e-10 * gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)[:, None, None]
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * eye, w_in @ target.transpose(1, 2)).transpose(1, 2)


def semi_nmf(target: Tensor, d_mlp: int, iterations: int = 500) -> tuple[Tensor, Tensor]:
    """A ~ W_out W_in with W_in >= 0 (the factor that feeds the ReLU) and W_out of free sign.

    target (K, n, n) -> (W_in (K, h, n) >= 0, W_out (K, n, h)). Starts from the SVD truncation with
    its negative input weights set to 0, then alternates: W_out by least squares given W_in (exact),
    and one projected gradient step on W_in with step 1 / |W_out^T W_out|_F (at most 1 / Lipschitz
    constant of the gradient), so the error |A - W_out W_in|_F never increases.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (n x h) matrices: on a busy CPU, threads cost more than the arithmetic
    try:
        w_in, _ = svd_factors(target, d_mlp)
        w_in = w_in.clamp_min(0)
        for _ in range(iterations):
            w_out = _output_weights(w_in, target)
            gram = w_out.transpose(1, 2) @ w_out  # (K, h, h)
            lipschitz = torch.linalg.matrix_norm(gram).clamp_min(1e-30)[:, None, None]
            gradient = gram @ w_in - w_out.transpose(1, 2) @ target
            w_in = (w_in - gradient / lipschitz).clamp_min(0)
        return w_in, _output_weights(w_in, target)
    finally:
        torch.set_num_threads(threads)


class SemiNMF(FactorBaseline):
    """W_out W_in ~ `oriented_target` (I + sigma M by default) with W_in >= 0 (`semi_nmf`): exact for single
    positive features when the factorisation is, and blind to negative inputs. Records the relative error
    |A - W_out W_in| / |A|."""

    def __init__(
        self,
        n_features: int = 100,
        d_mlp: int = 50,
        seeds: Sequence[int] = (0,),
        iterations: int = 500,
        orientation: Orientation = "direct",
    ):
        super().__init__(n_features, d_mlp, seeds, orientation)
        check_sizes(**{"model.network.init_args.iterations": iterations})
        self.iterations = iterations
        self.register_buffer("reconstruction_error", torch.zeros(self.n_instances))

    def build(self, task: Task) -> tuple[Tensor, Tensor]:
        target = oriented_target(task, self.orientation)
        w_in, w_out = semi_nmf(target, self.d_mlp, self.iterations)
        error = torch.linalg.matrix_norm(target - w_out @ w_in) / torch.linalg.matrix_norm(target)
        self.reconstruction_error.copy_(error)
        return w_in.float(), w_out.float()

    def describe_instance(self, k: int) -> dict:
        return super().describe_instance(k) | {"reconstruction_error": float(self.reconstruction_error[k])}


BASELINES = (Zero, Naive, NaiveOffset, SVD, SemiNMF)

__all__ = [
    "BASELINES",
    "SVD",
    "Baseline",
    "FactorBaseline",
    "Naive",
    "NaiveOffset",
    "SemiNMF",
    "Zero",
    "flip_to_positive",
    "offset_scan",
    "oriented_target",
    "semi_nmf",
    "svd_factors",
    "target_matrix",
]
