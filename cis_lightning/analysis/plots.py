"""The paper's figures, drawn with matplotlib's Agg canvas.

The figures of one trained instance take plain tensors (no leading K); the sweep figures take result
rows, one dict per row of a run's results.csv or results_by_p.csv (`cis_lightning.runs.results.read_results`), and
compare the instances of a sweep. Every function returns a `matplotlib.figure.Figure` and touches
no global pyplot state, so it is safe in callbacks, threads and notebooks alike (display a figure in
a notebook with `IPython.display.display(fig)`).
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from cis_lightning.analysis import EntryFit, eigen_alignment, eigen_basis, svd_alignment

__all__ = [
    "alignment_figure",
    "entry_fit_figure",
    "feature_heatmap_figure",
    "interference_figure",
    "loss_against_eval_p_figure",
    "loss_against_p_figure",
    "loss_against_sigma_figure",
    "loss_and_sigma_against_rank_figure",
    "loss_errorbars",
    "naive_line",
    "response_figure",
    "sweep_figures",
    "weight_bars_figure",
]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _np(t: Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _heatmap(fig: Figure, ax, values: np.ndarray, title: str, xlabel: str, ylabel: str, limit: float | None = None):
    limit = limit if limit is not None else max(float(np.abs(values).max()), 1e-12)
    image = ax.imshow(values, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(image, ax=ax, shrink=0.8)


def alignment_figure(w_in: Tensor, w_out: Tensor, m: Tensor, title: str = "") -> Figure:
    """cos(E_i, W_out W_in E_i) and cos(U_i, W_out W_in V_i) against i, and the projections of the weights
    on the eigenvectors: W_in E (neuron x i) and W_out^T E (neuron x i). w_in (h, n), w_out (n, h), m (n, n)."""
    h, n = w_in.shape
    w_in, w_out, m = w_in[None], w_out[None], m[None]
    cos_eig, cos_svd = _np(eigen_alignment(w_in, w_out, m)[0]), _np(svd_alignment(w_in, w_out, m)[0])
    _, e = eigen_basis(m)
    proj_in = _np((w_in.double() @ e)[0])  # (h, n): neuron a's input weights along E_i
    proj_out = _np((w_out.double().transpose(1, 2) @ e)[0])
    fig = _figure(13, 3.8)
    axes = fig.subplots(1, 3, width_ratios=[1.2, 1, 1])
    ax = axes[0]
    index = np.arange(n)
    ax.plot(index, cos_eig, label=r"$\cos(E_i, W_{out} W_{in} E_i)$")
    ax.plot(index, cos_svd, label=r"$\cos(U_i, W_{out} W_{in} V_i)$", alpha=0.8)
    ax.axvline(h - 0.5, color="k", ls=":", lw=1, label=f"$d_{{mlp}}$ = {h}")
    top, rest = cos_eig[:h].mean(), (cos_eig[h:].mean() if h < n else float("nan"))
    ax.set(
        xlabel="eigen- / singular vector index i (descending)",
        ylabel="cosine similarity",
        ylim=(-0.25, 1.05),
        title=f"{title} mean cos: i<{h} {top:.2f}, i>={h} {rest:.2f}".strip(),
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    limit = max(np.abs(proj_in).max(), np.abs(proj_out).max(), 1e-12)
    _heatmap(fig, axes[1], proj_in, r"$W_{in} E$", "eigenvector index i", "neuron", limit)
    _heatmap(fig, axes[2], proj_out, r"$W_{out}^T E$", "eigenvector index i", "neuron", limit)
    return fig


def loss_against_p_figure(
    ps: list[float],
    loss_per_feature: Tensor,
    trained_p: list[float],
    loss_at_trained_p: Tensor,
    naive: float,
    labels: list[str] | None = None,
) -> Figure:
    """L / p against the evaluation p for K models: loss_per_feature (K, P) on the grid ps, each model's
    own training p marked, and the naive model's (n - d_mlp) / n / 6."""
    fig = _figure(6.4, 4)
    ax = fig.subplots()
    values = _np(loss_per_feature)
    at_trained = _np(loss_at_trained_p)
    for k in range(values.shape[0]):
        label = labels[k] if labels else f"trained at p={trained_p[k]:.3g}"
        (line,) = ax.plot(ps, values[k], marker=".", label=label)
        ax.plot([trained_p[k]], [at_trained[k]], marker="o", ms=8, color=line.get_color(), mec="k")
    ax.axhline(naive, color="k", ls="--", lw=1, label=f"naive {naive:.4f}")
    ax.plot([], [], ls="", marker="o", color="w", mec="k", label="p_eval = p_train")
    ax.set_xscale("log")
    if (values > 0).all() and naive > 0:
        ax.set_yscale("log")
    ax.set(xlabel="evaluation feature probability p", ylabel="loss per feature L / p")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def response_figure(x: Tensor, response: Tensor, target: Tensor, title: str = "") -> Figure:
    """Output i against input x_i (others 0) for every feature i: response and target (n, S), x (S,).
    Colour runs with the feature index; the black dashed line is the mean label."""
    n = response.shape[0]
    fig = _figure(6.4, 4)
    ax = fig.subplots()
    xs, ys = _np(x), _np(response)
    colors = _colormap("viridis", n)
    for i in range(n):
        ax.plot(xs, ys[i], color=colors[i], lw=0.8, alpha=0.7)
    ax.plot(xs, _np(target).mean(0), color="k", ls="--", lw=1.5, label="label (mean over features)")
    ax.set(
        xlabel=r"input $x_i$ (other features 0)", ylabel=r"output $\hat y_i$", title=title or "input-output response"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    _feature_colorbar(fig, ax, n)
    return fig


def _colormap(name: str, count: int) -> np.ndarray:
    from matplotlib import colormaps

    return colormaps[name](np.linspace(0, 1, max(count, 2)))


def _feature_colorbar(fig: Figure, ax, n: int) -> None:
    from matplotlib import cm, colors

    mappable = cm.ScalarMappable(norm=colors.Normalize(0, n - 1), cmap="viridis")
    fig.colorbar(mappable, ax=ax, label="feature index", shrink=0.8)


def weight_bars_figure(products: Tensor, title: str = "") -> Figure:
    """Stacked bars of W_in[a, i] W_out[i, a] (products (h, n)): for every feature i, one segment per
    neuron a, positive ones stacked up and negative ones down; their sum is (W_out W_in)_ii."""
    from matplotlib.collections import PolyCollection

    values = _np(products)
    h, n = values.shape
    positive, negative = np.clip(values, 0, None), np.clip(values, None, 0)
    # Segment a of bar i spans [sum of the earlier neurons' parts, that + its own part].
    tops = np.concatenate([np.cumsum(positive, 0), np.cumsum(negative, 0)])  # (2h, n)
    bottoms = tops - np.concatenate([positive, negative])
    left = np.broadcast_to(np.arange(n) - 0.42, tops.shape)
    right = left + 0.84
    corners = [(left, bottoms), (right, bottoms), (right, tops), (left, tops)]
    # One rectangle per (sign, neuron, feature), all in one artist: 10^4 separate bars draw slowly.
    boxes = np.stack([np.stack(c, -1) for c in corners], axis=-2).reshape(-1, 4, 2)
    colors = np.tile(np.repeat(_colormap("tab20", 20)[np.arange(h) % 20], n, axis=0), (2, 1))
    fig = _figure(10, 3.6)
    ax = fig.subplots()
    ax.add_collection(PolyCollection(boxes, facecolors=colors, linewidths=0))
    ax.plot(np.arange(n), values.sum(0), "k.", ms=3, label=r"$(W_{out} W_{in})_{ii}$")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlim(-1, n)
    ax.set_ylim(min(bottoms.min(), 0) * 1.05 - 1e-9, max(tops.max(), 0) * 1.05 + 1e-9)
    ax.set(xlabel="feature i", ylabel=r"$W_{in}[a,i]\, W_{out}[i,a]$, stacked over neurons a", title=title)
    ax.legend(fontsize=8, loc="upper right")
    return fig


def interference_figure(plus: Tensor, minus: Tensor, title: str = "") -> Figure:
    """Outputs (n, n) for one-hot inputs +e_i and -e_i: row i = input feature, column j = output feature."""
    a, b = _np(plus), _np(minus)
    limit = max(np.abs(a).max(), np.abs(b).max(), 1e-12)
    fig = _figure(10, 4.2)
    axes = fig.subplots(1, 2)
    _heatmap(fig, axes[0], a, r"input $x_i = +1$", "output feature j", "input feature i", limit)
    _heatmap(fig, axes[1], b, r"input $x_i = -1$", "output feature j", "input feature i", limit)
    if title:
        fig.suptitle(title)
    return fig


def entry_fit_figure(m: Tensor, p: Tensor, fit: EntryFit, title: str = "") -> Figure:
    """Entries of P = W_out W_in against those of M (n, n), with the off-diagonal fit through 0 and the
    diagonal's line fit (`analysis.entry_fit`, one instance: 0-d tensors)."""
    mm, pp = _np(m), _np(p)
    n = mm.shape[0]
    off = ~np.eye(n, dtype=bool)
    fig = _figure(5.6, 4.4)
    ax = fig.subplots()
    ax.scatter(mm[off], pp[off], s=3, alpha=0.3, label="off-diagonal", lw=0)
    ax.scatter(np.diag(mm), np.diag(pp), s=10, alpha=0.8, label="diagonal", color="C1", lw=0)
    slope = float(fit.offdiag_slope)
    xs = np.linspace(mm[off].min(), mm[off].max(), 2)
    ax.plot(xs, slope * xs, "r-", label=f"off-diag fit: y = {slope:.3f} x (r = {float(fit.offdiag_correlation):.2f})")
    diag_slope, intercept = float(fit.diag_slope), float(fit.diag_intercept)
    if math.isnan(diag_slope):  # M's diagonal is constant: only the mean of P's diagonal is defined
        ax.plot([np.diag(mm).mean()], [intercept], "gD", ms=7, label=f"diag mean: {intercept:.3f}")
    else:
        xd = np.linspace(np.diag(mm).min(), np.diag(mm).max(), 2)
        ax.plot(xd, diag_slope * xd + intercept, "g-", label=f"diag fit: y = {diag_slope:.3f} x + {intercept:.3f}")
    ax.set(
        xlabel=r"$M_{ij}$", ylabel=r"$(W_{out} W_{in})_{ij}$", title=title or r"entries of $W_{out} W_{in}$ against $M$"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def feature_heatmap_figure(steps: list[int], losses: Tensor, naive: float, title: str = "") -> Figure:
    """L_j / p of every feature j (rows) at every logged step (columns); losses (T, n).
    The colour scale runs from 0 to at least 1/6, the loss of a feature that gets no neuron."""
    values = _np(losses).T  # (n, T)
    fig = _figure(7, 4.4)
    ax = fig.subplots()
    top = max(float(np.nanmax(values)) if values.size else 0.0, 1 / 6)
    image = ax.imshow(
        values,
        aspect="auto",
        cmap="magma_r",
        vmin=0,
        vmax=top,
        interpolation="nearest",
        extent=(-0.5, len(steps) - 0.5, values.shape[0] - 0.5, -0.5),
    )
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int))
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    ax.set(
        xlabel="training step",
        ylabel="output feature j",
        title=title or f"L_j / p per feature (naive mean {naive:.4f})",
    )
    fig.colorbar(image, ax=ax, label="L_j / p", shrink=0.8)
    return fig


# -- sweep figures: one point per result row -------------------------------------------------------
def naive_line(ax, naive: float) -> None:
    """The naive model's L / p, (n - d_mlp) / n / 6, as a dashed grey line."""
    ax.axhline(naive, color="grey", linestyle="--", linewidth=1, label="naive")


def loss_errorbars(ax, rows: list[dict], x: str, label: str, **style) -> None:
    """L / p with its standard error against the column `x`, one point per row, in order of x."""
    rows = sorted(rows, key=lambda r: r[x])
    ax.errorbar(
        [r[x] for r in rows],
        [r["loss_per_feature"] for r in rows],
        yerr=[r["loss_per_feature_stderr"] for r in rows],
        label=label,
        capsize=2,
        **style,
    )


def _true(value) -> bool:
    """A boolean column, as written (True) or as read back from the CSV ("True")."""
    return str(value) == "True"


def loss_against_sigma_figure(rows: list[dict], naive: float) -> Figure:
    """L / p against the configured sigma, one line per mixing kind and symmetry (results.csv rows)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row.get("mixing.kind"), _true(row.get("mixing.symmetric"))), []).append(row)
    kinds = list(dict.fromkeys(kind for kind, _ in groups))
    fig = _figure(5, 3.4)
    ax = fig.subplots()
    for kind, symmetric in sorted(groups, key=lambda g: (kinds.index(g[0]), not g[1])):  # symmetric first
        symmetry = "symmetric" if symmetric else "asymmetric"
        label = f"{symmetry} M" if len(kinds) == 1 else f"{kind}, {symmetry}"
        loss_errorbars(ax, groups[kind, symmetric], "configured_sigma", label, marker=".")
    naive_line(ax, naive)
    ps = {row["p"] for row in rows if "p" in row}
    at_p = f" (p = {ps.pop():g})" if len(ps) == 1 else ""
    ax.set(xlabel="sigma", ylabel="L / p", title=f"Loss per feature against sigma{at_p}")
    ax.legend()
    return fig


def loss_against_eval_p_figure(
    rows_by_p: list[dict], rows: list[dict], naive: float, ylim: tuple[float, float] | None = None
) -> Figure:
    """L / p against the evaluation p (results_by_p.csv rows), one line per trained instance labelled by its
    training p, and a dot at that instance's own L / p at its training p (results.csv rows)."""
    lines: dict[tuple, list[dict]] = {}
    for row in rows_by_p:
        lines.setdefault((row["p"], row.get("instance")), []).append(row)
    keys = sorted(lines, key=lambda key: (key[0], -1 if key[1] is None else key[1]))
    shared = {p for p, _ in keys if sum(q == p for q, _ in keys) > 1}  # training p of more than one instance
    fig = _figure(6, 3.8)
    ax = fig.subplots()
    for i, (p, instance) in enumerate(keys):
        color = f"C{i % 10}"
        label = f"p_train {p:g}" + (f", instance {int(instance)}" if p in shared else "")
        loss_errorbars(ax, lines[p, instance], "eval_p", label, color=color, linewidth=1)
        own = [r for r in rows if r["p"] == p and instance in (None, r.get("instance"))]
        if own:
            ax.plot([p], [own[0]["loss_per_feature"]], "o", color=color)
    naive_line(ax, naive)
    ax.set(xscale="log", xlabel="evaluation p", ylabel="L / p", title="L/p against evaluation p, per training p")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=6, ncol=2)
    return fig


def loss_and_sigma_against_rank_figure(rows: list[dict], naive: float) -> Figure:
    """Two panels against the effective rank of M (results.csv rows): L / p, and sigma (learned, when it is)."""
    rows = sorted(rows, key=lambda r: r["mixing_effective_rank"])
    learned = any(_true(r.get("learn_sigma", True)) for r in rows)
    fig = _figure(8.4, 3.2)
    axes = fig.subplots(1, 2)
    loss_errorbars(axes[0], rows, "mixing_effective_rank", "trained", marker="o")
    naive_line(axes[0], naive)
    axes[0].set(xlabel="effective rank of M", ylabel="L / p", title="Loss")
    axes[1].plot([r["mixing_effective_rank"] for r in rows], [r["sigma"] for r in rows], "o-")
    axes[1].set(
        xlabel="effective rank of M",
        ylabel="learned sigma" if learned else "sigma",
        title="Learned sigma" if learned else "Sigma (fixed)",
    )
    return fig


RANK_SPREAD = 0.1


def sweep_figures(rows: list[dict], rows_by_p: list[dict], naive: float) -> dict[str, Figure]:
    """The sweep figures that a run's grid calls for, by name, from its results.csv rows and results_by_p.csv
    rows (none without `model.test_feature_probabilities`): `sweep_sigma` when the configured sigma varies
    across instances, `sweep_eval_p` when there are results_by_p rows, `sweep_rank` when the effective
    rank of M spreads over more than RANK_SPREAD of its largest value (seeds alone move a random M's
    rank by a few percent: 1-2% for a Gaussian M of n = 100, up to 8% for a low-rank one of rank 20).
    None for one instance: `Figures`' own loss_against_p already shows it against the evaluation p."""
    if len(rows) < 2:
        return {}
    figures = {}
    if len({r["configured_sigma"] for r in rows}) > 1:
        figures["sweep_sigma"] = loss_against_sigma_figure(rows, naive)
    if rows_by_p:
        figures["sweep_eval_p"] = loss_against_eval_p_figure(rows_by_p, rows, naive)
    ranks = [r["mixing_effective_rank"] for r in rows]
    if max(ranks) - min(ranks) > RANK_SPREAD * max(ranks):
        figures["sweep_rank"] = loss_and_sigma_against_rank_figure(rows, naive)
    return figures


def to_image(fig: Figure) -> np.ndarray:
    """The figure as an RGB array (H, W, 3) uint8."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
