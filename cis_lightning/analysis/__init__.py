"""The paper's analyses of a trained model, as pure functions on tensors (no Lightning, no plotting).

Shapes: K instances, n features, h neurons, B samples. Weights are the effective weights in feature
space, W_in (K, h, n) and W_out (K, n, h), so the model's linear part is P = W_out W_in (K, n, n).
M (K, n, n) is the *total* mixing the labels carry in the MLP picture: `total_mixing(model, task)`,
sigma M from the task plus I - W_E W_E^T for the residual model (docs/derivation.md).

Eigen-subspace alignment (Bhagat et al. 2026): E_i, the eigenvectors of the symmetric part
(M + M^T) / 2 sorted by descending eigenvalue; the trained P captures the top ~h of them,
cos(E_i, P E_i) ~ 1 for i < h, and ignores the rest.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor
from torchmetrics import Metric

from cis_lightning.core.mixing import effective_rank
from cis_lightning.core.models import CCModel
from cis_lightning.core.task import Stream, Task
from cis_lightning.evaluation import evaluation_probability

__all__ = [
    "EntryFit",
    "FeatureLoss",
    "alignment_summary",
    "direction_energy",
    "effective_rank",
    "eigen_alignment",
    "eigen_basis",
    "entry_fit",
    "input_output_response",
    "interference",
    "per_feature_loss",
    "positive_subspace",
    "principal_angles",
    "squared_error",
    "subspace_energy",
    "svd_alignment",
    "total_mixing",
    "weight_products",
]


@torch.no_grad()
def total_mixing(model: CCModel, task: Task) -> Tensor:
    """M (K, n, n) that the model's effective MLP is trained against: effective_mixing() + sigma M."""
    return (model.effective_mixing() + task.scaled_mixing()).detach()


def _cosine(a: Tensor, pb: Tensor, p: Tensor, dtype: torch.dtype) -> Tensor:
    """cos of the angle between the columns of a and of pb = P b (K, n, m) -> (K, m).

    Where P b vanishes to round-off (below n eps(dtype) ||P||_F, dtype the weights' own) the
    angle is undefined; it counts as 0, since P discards that direction.
    """
    norm = pb.norm(dim=-2)
    floor = pb.shape[-2] * torch.finfo(dtype).eps * torch.linalg.matrix_norm(p)[:, None]
    cos = (a * pb).sum(dim=-2) / (a.norm(dim=-2) * norm).clamp_min(torch.finfo(pb.dtype).tiny)
    return torch.where(norm > floor, cos, torch.zeros((), dtype=cos.dtype, device=cos.device))


def eigen_basis(m: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (K, n) in descending order and eigenvectors E (K, n, n), E[:, :, i] = E_i, of (M + M^T) / 2.

    Computed in float64: the spectrum of a small Gaussian M is dense and float32 mixes neighbours.
    """
    sym = m.double()
    values, vectors = torch.linalg.eigh((sym + sym.transpose(-1, -2)) / 2)
    return values.flip(-1), vectors.flip(-1)


def eigen_alignment(w_in: Tensor, w_out: Tensor, m: Tensor) -> Tensor:
    """cos(E_i, W_out W_in E_i) for every eigenvector E_i of (M + M^T) / 2, descending eigenvalue: (K, n)."""
    _, e = eigen_basis(m)
    p = w_out.double() @ w_in.double()
    return _cosine(e, p @ e, p, w_in.dtype).to(w_in.dtype)


def svd_alignment(w_in: Tensor, w_out: Tensor, m: Tensor) -> Tensor:
    """cos(U_i, W_out W_in V_i) for the SVD I + M = U S V^T, descending singular value: (K, n).

    P = I + M would give 1 everywhere: P V_i = S_i U_i.
    """
    eye = torch.eye(m.shape[-1], dtype=torch.float64, device=m.device)
    u, _, vh = torch.linalg.svd(eye + m.double())
    v = vh.transpose(-1, -2)
    p = w_out.double() @ w_in.double()
    return _cosine(u, p @ v, p, w_in.dtype).to(w_in.dtype)


def direction_energy(w_in: Tensor, w_out: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """The share of the weights' energy along each basis direction: (K, n) each, every row summing to 1.

    For the rows of W_in: ||W_in E_i||^2 / ||W_in||_F^2; for the columns of W_out:
    ||W_out^T E_i||^2 / ||W_out||_F^2. `basis` (K, n, n) is orthonormal (e.g. `eigen_basis`).
    """
    basis = basis.double()
    e_in = (w_in.double() @ basis).pow(2).sum(dim=-2)  # (K, n)
    e_out = (w_out.double().transpose(-1, -2) @ basis).pow(2).sum(dim=-2)
    tiny = torch.finfo(torch.float64).tiny
    return e_in / e_in.sum(-1, keepdim=True).clamp_min(tiny), e_out / e_out.sum(-1, keepdim=True).clamp_min(tiny)


def positive_subspace(eigenvalues: Tensor) -> Tensor:
    """Mask (K, n) of the eigenvalues > 0, with a tolerance for round-off (M = 0 has no positive subspace)."""
    scale = eigenvalues.abs().amax(dim=-1, keepdim=True)
    return eigenvalues > eigenvalues.shape[-1] * torch.finfo(eigenvalues.dtype).eps * scale


def subspace_energy(w_in: Tensor, w_out: Tensor, m: Tensor, dim: int | None = None) -> dict[str, Tensor]:
    """Fractions of the weights' energy in the top-`dim` (default h) and in the positive eigen-subspace of M.

    Returns (K,) tensors: in_top, out_top, in_positive, out_positive, and the fraction a uniformly
    random subspace of the same size would hold, dim / n (random_top) and n_positive / n (random_positive).
    """
    n = m.shape[-1]
    dim = w_in.shape[-2] if dim is None else dim
    values, e = eigen_basis(m)
    e_in, e_out = direction_energy(w_in, w_out, e)
    positive = positive_subspace(values)
    k = m.shape[0]
    return {
        "in_top": e_in[:, :dim].sum(-1),
        "out_top": e_out[:, :dim].sum(-1),
        "in_positive": (e_in * positive).sum(-1),
        "out_positive": (e_out * positive).sum(-1),
        "random_top": torch.full((k,), min(dim, n) / n, dtype=torch.float64, device=m.device),
        "random_positive": positive.sum(-1).double() / n,
    }


def _column_basis(a: Tensor) -> Tensor:
    """Orthonormal basis of the column space of a (K, n, h): (K, n, h), columns beyond the rank zeroed."""
    u, s, _ = torch.linalg.svd(a.double(), full_matrices=False)
    keep = s > max(a.shape[-2:]) * torch.finfo(torch.float64).eps * s[..., :1]
    return u * keep[..., None, :]


def principal_angles(w_in: Tensor, w_out: Tensor, m: Tensor, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """Principal angles (radians, ascending) between the top-`dim` eigen-subspace of M and
    the row space of W_in, and the column space of W_out: (K, min(h, dim)) each.

    cos(theta_j) are the singular values of Q^T E_top, Q an orthonormal basis of the weights' space.
    Directions missing from a rank-deficient W count as orthogonal (90 degrees).
    """
    dim = w_in.shape[-2] if dim is None else dim
    _, e = eigen_basis(m)
    top = e[..., :dim]
    angles = []
    for space in (w_in.transpose(-1, -2), w_out):
        cos = torch.linalg.svdvals(_column_basis(space).transpose(-1, -2) @ top)
        angles.append(torch.arccos(cos.clamp(0, 1))[..., : min(space.shape[-1], dim)])
    return angles[0], angles[1]


@dataclasses.dataclass
class EntryFit:
    """Least-squares fits of the entries of P = W_out W_in against those of M, all (K,).

    Off-diagonal: P_ij = slope M_ij through 0; correlation is their Pearson correlation.
    Diagonal: P_ii = diag_slope M_ii + diag_intercept. If M's diagonal is constant (a zero-diagonal
    M, an option; the authors keep it) the slope is undefined: NaN, and the intercept is the mean of P_ii.
    """

    offdiag_slope: Tensor
    offdiag_correlation: Tensor
    diag_slope: Tensor
    diag_intercept: Tensor


def entry_fit(w_in: Tensor, w_out: Tensor, m: Tensor) -> EntryFit:
    p, m = (w_out.double() @ w_in.double()), m.double()
    n = m.shape[-1]
    off = ~torch.eye(n, dtype=torch.bool, device=m.device)
    tiny = torch.finfo(torch.float64).tiny
    x, y = m[:, off], p[:, off]  # (K, n(n-1))
    slope = (x * y).sum(-1) / x.pow(2).sum(-1).clamp_min(tiny)
    xc, yc = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    correlation = (xc * yc).sum(-1) / (xc.norm(dim=-1) * yc.norm(dim=-1)).clamp_min(tiny)
    dx, dy = m.diagonal(dim1=-2, dim2=-1), p.diagonal(dim1=-2, dim2=-1)
    dxc = dx - dx.mean(-1, keepdim=True)
    spread = dxc.pow(2).sum(-1)
    constant = spread <= (n * torch.finfo(torch.float64).eps * dx.abs().amax(-1).clamp_min(1)) ** 2
    diag_slope = torch.where(constant, torch.nan, (dxc * dy).sum(-1) / spread.clamp_min(tiny))
    diag_intercept = dy.mean(-1) - torch.where(constant, 0.0, diag_slope) * dx.mean(-1)
    return EntryFit(slope, correlation, diag_slope, diag_intercept)


def weight_products(w_in: Tensor, w_out: Tensor) -> Tensor:
    """W_in * W_out^T elementwise: (K, h, n), entry [a, i] = neuron a's contribution W_out[i, a] W_in[a, i]
    to the diagonal (W_out W_in)_ii. The paper's stacked weight bars stack it over neurons."""
    return w_in * w_out.transpose(-1, -2)


def squared_error(model: CCModel, task: Task, x: Tensor) -> Tensor:
    """(y_hat - y)^2 for every sample and output feature: (K, B, n)."""
    return (model(x) - task.labels(x, residual=model.residual)).pow(2)


class FeatureLoss(Metric):
    """L_j / p of every output feature j, L_j the mean over samples of (y_hat_j - y_j)^2: compute() -> (K, n).

    The mean over j is the usual L / p. update((K, B, n) squared errors) never syncs with the host;
    ranks that saw different samples sum their states.
    """

    full_state_update = False

    def __init__(self, feature_probability: list[float], n_features: int):
        super().__init__()
        self.register_buffer("p", torch.tensor(feature_probability, dtype=torch.float64), persistent=False)
        self.add_state(
            "total",
            default=torch.zeros(len(feature_probability), n_features, dtype=torch.float64),
            dist_reduce_fx="sum",
        )
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, errors: Tensor) -> None:
        self.total += errors.double().sum(dim=1)
        self.count += errors.shape[1]

    def compute(self) -> Tensor:
        return self.total / self.count.clamp_min(1) / self.p.to(self.total)[:, None]


@torch.no_grad()
def per_feature_loss(
    model: CCModel,
    task: Task,
    n_samples: int = 200_000,
    batch_size: int = 65536,
    feature_probability: list[float] | None = None,
) -> Tensor:
    """L_j / p for every instance and output feature (K, n), from n_samples draws of the ANALYSIS stream.

    p is the instance's evaluation p (1/n for exactly-one-active data) unless `feature_probability`
    (K floats) overrides it. A one-process sum (no collective): safe to call on one rank only.
    """
    ps = evaluation_probability(task) if feature_probability is None else list(feature_probability)
    total = torch.zeros(task.n_instances, task.n_features, dtype=torch.float64, device=task.mixing.device)
    n_batches = math.ceil(n_samples / batch_size)
    for step in range(n_batches):
        x = task.sample(batch_size, step, Stream.ANALYSIS, feature_probability=feature_probability)
        total += squared_error(model, task, x).double().sum(dim=1)
    p = torch.tensor(ps, dtype=torch.float64, device=total.device)
    return total / (n_batches * batch_size) / p[:, None]


def _one_hot_inputs(model: CCModel, values: Tensor) -> Tensor:
    """x (K, n * S, n): sample i * S + s is values[s] * e_i."""
    n, k = model.n_features, model.n_instances
    device = model.effective_weights()[0].device
    eye = torch.eye(n, device=device)
    x = eye[:, None, :] * values.to(device)[None, :, None]  # (n, S, n)
    return x.reshape(1, -1, n).expand(k, -1, -1)


@torch.no_grad()
def _response(model: CCModel, task: Task, values: Tensor) -> tuple[Tensor, Tensor]:
    """Outputs and labels (K, n_inputs, S, n_outputs) for one-hot inputs values[s] * e_i.

    For a residual network the residual stream's x is subtracted from both, so that every model
    is read in the same coordinates as the MLP's labels ReLU(x) + sigma M x.
    """
    x = _one_hot_inputs(model, values)
    y_hat, y = model(x), task.labels(x, residual=model.residual)
    if model.residual:
        y_hat, y = y_hat - x, y - x
    k, n, s = model.n_instances, model.n_features, values.shape[0]
    return y_hat.reshape(k, n, s, n), y.reshape(k, n, s, n)


def input_output_response(model: CCModel, task: Task, n_points: int = 101) -> tuple[Tensor, Tensor, Tensor]:
    """Each feature's own output as its input x_i sweeps [-1, 1], the others 0.

    Returns x values (S,), outputs y_hat_i(x e_i) (K, n, S) and labels y_i(x e_i) (K, n, S).
    """
    values = torch.linspace(-1, 1, n_points)
    y_hat, y = _response(model, task, values)
    own = torch.arange(model.n_features)
    return values, y_hat[:, own, :, own].permute(1, 0, 2), y[:, own, :, own].permute(1, 0, 2)


def interference(model: CCModel, task: Task) -> tuple[Tensor, Tensor]:
    """Outputs for one-hot inputs at +1 and at -1: (K, n, n) each, row i = input e_i (or -e_i), column j = output j."""
    y_hat, _ = _response(model, task, torch.tensor([1.0, -1.0]))
    return y_hat[:, :, 0], y_hat[:, :, 1]


def alignment_summary(w_in: Tensor, w_out: Tensor, m: Tensor) -> dict[str, Tensor]:
    """The scalars the EigenAlignment callback logs, (K,) each, with h = d_mlp = W_in.shape[1]:
    mean cos(E_i, P E_i) over i < h and i >= h (eig_top, eig_rest; no rest if h >= n), the same for the SVD of I + M,
    the energy fractions of `subspace_energy`, the mean principal angles in degrees, the
    off-diagonal entry slope and the mean of P's diagonal.
    """
    h, n = w_in.shape[-2], m.shape[-1]
    eig, svd = eigen_alignment(w_in, w_out, m).double(), svd_alignment(w_in, w_out, m).double()
    angle_in, angle_out = principal_angles(w_in, w_out, m)
    fit = entry_fit(w_in, w_out, m)
    summary = {"cos_eig_top": eig[:, :h].mean(-1), "cos_svd_top": svd[:, :h].mean(-1)}
    if h < n:  # with a neuron per feature there is no "rest"
        summary |= {"cos_eig_rest": eig[:, h:].mean(-1), "cos_svd_rest": svd[:, h:].mean(-1)}
    summary |= {f"energy_{k}": v for k, v in subspace_energy(w_in, w_out, m).items()}
    summary |= {
        "angle_in_deg": torch.rad2deg(angle_in).mean(-1),
        "angle_out_deg": torch.rad2deg(angle_out).mean(-1),
        "offdiag_slope": fit.offdiag_slope,
        "diag_mean": (w_out.double() @ w_in.double()).diagonal(dim1=-2, dim2=-1).mean(-1),
    }
    return summary
