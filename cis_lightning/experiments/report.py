"""`cis report`: the paper's experiments side by side in one Markdown page (and its JSON twin).

    cis report RUN_DIR... [--output report.md]     collect results.csv files into a report

`cis reproduce` (experiments/reproduce.py) runs the experiments and then writes this report.

A run directory is found by its results.csv (written by `cis test`); its config.yaml says which
experiment it belongs to (the logger's name) and which model it tested, and the fit directory of
its checkpoint holds weights.pt for the weight analyses. Every claim of the paper ("What the paper
finds") gets a verdict computed from the measured numbers and their standard errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

from cis_lightning.analysis import plots
from cis_lightning.core.errors import ConfigError, require
from cis_lightning.lightning.run_directory import check_writable_directory
from cis_lightning.runs import Run, read_run
from cis_lightning.runs.loading import read_checkpoint
from cis_lightning.runs.results import RESULTS, instance_tag

EXPERIMENTS = (
    "sigma_sweep",
    "sparsity_regimes",
    "mixing_comparison",
    "eigen_alignment",
    "offset_baseline",
    "semi_nmf",
    "rank_study",
    "transplant",
)
# The authors' script each experiment follows (Stefan-Heimersheim/toy-model-of-computation-in-superposition,
# paper_code/), and every deliberate deviation from it with its reason.
COMMON_DEVIATIONS = [
    "evaluation by our stratified evaluator at about 10^6 non-empty samples per point (exact where a "
    "closed form exists) instead of dense batches; at most 10 evaluation p instead of 100 (cost)",
]
SOURCES: dict[str, tuple[str, list[str]]] = {
    "sigma_sweep": ("nb2_noise_equivalence.py", ["the authors evaluate the sweep with 10^7-10^8 samples (cost)"]),
    "sparsity_regimes": (
        "nb1_sparsity_regimes.py",
        ["the ten models train in one run (K = 10), each on its own cosine schedule of 10,000 / q steps"],
    ),
    "mixing_comparison": (
        "nb2_noise_equivalence.py",
        [
            "the embedding-like M in both signs: the authors' W_E W_E^T - I (their figure) and the residual "
            "model's own I - W_E W_E^T (docs/derivation.md)"
        ],
    ),
    "eigen_alignment": ("nb3_svd_nmf.py", []),
    "offset_baseline": ("nb4_bias_strength.py", []),
    "semi_nmf": (
        "nb3_svd_nmf.py, nb8_test_baselines.py",
        [
            "our own semi-NMF (SVD start, exact least squares for W_out, projected gradient for W_in >= 0) "
            "instead of sklearn's NMF start; no sklearn dependency",
            "both orientations of the SVD and semi-NMF baselines: the authors' factor assignment implements "
            "I + sigma M^T ('authors'), the labels need I + sigma M ('direct')",
            "the trained comparison (semi_nmf_trained.yaml) at batch 2048 and the paper's 10,000 steps",
        ],
    ),
    "rank_study": (
        "nb6_mixing_matrix_rank_jb.py",
        ["x axis: the measured effective rank of each M (the authors place the points at 80, 60, 40, 30, 20)"],
    ),
    "transplant": (
        "nb2_noise_equivalence.py (second half)",
        [
            "each curve is one model's training, then its own fine-tune (the authors' figure joins the "
            "asymmetric-Gaussian model's curve to the embedding model's fine-tune)",
            "the training loss is logged every 50 steps (Lightning's default), averaged over a window of 10 logs",
        ],
    ),
}
CONFIGS = "configs/experiments"  # where the report says each experiment's config is (`cis configs`)


# -- reading runs ---------------------------------------------------------------------------------
def find_runs(directories: list[Path]) -> list[Run]:
    """Every results.csv under the given directories, with its experiment name and fit weights; of the
    versions of one run directory (Lightning's <save_dir>/<name>/version_N, a rerun adds one) only the
    newest of each model, so that a rerun replaces the runs it repeats instead of joining them."""
    newest: dict[tuple[Path, str], Run] = {}
    for run in _all_runs(directories):
        slot = (run.directory.parent.resolve(), run.model, _slot_orientation(run))
        if slot not in newest or _version(run.directory) > _version(newest[slot].directory):
            newest[slot] = run
    return sorted(newest.values(), key=lambda run: (str(run.directory.parent), _version(run.directory)))


def _version(directory: Path) -> tuple[int, float]:
    """Lightning's version number N of a version_N directory (-1 otherwise), then its results' time."""
    match = re.fullmatch(r"version_(\d+)", directory.name)
    return (int(match.group(1)) if match else -1, (directory / "results.csv").stat().st_mtime)


def _slot_orientation(run: Run) -> str:
    return str(run.results[0].get("orientation", "")) if run.results else ""


def _all_runs(directories: list[Path]) -> list[Run]:
    return [read_run(results.parent) for results in sorted(p for d in directories for p in Path(d).rglob(RESULTS))]


def naive_of(runs: list[Run]) -> float:
    """The naive model's L / p for the runs' sizes (n features, d_mlp neurons), as their results give it."""
    values = {run.naive_loss_per_feature for run in runs} - {None}
    require(len(values) == 1, "report", f"the runs of one section must share their sizes (naive L/p: {sorted(values)})")
    return values.pop()


# -- figures: the sweep figures are plots.*_figure; the report's own ones are drawn here -------------
DPI = 80  # the report's PNGs


def _figure(width: float = 5.0, height: float = 3.4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=DPI, constrained_layout=True)
    return fig, ax


def _png(figures: Path, name: str) -> Path:
    """The PNG `name` of the report `figures` (its path without .md): report.md -> report_<name>.png."""
    return figures.parent / f"{figures.name}_{name}.png"


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)  # a pyplot figure of this module; a no-op for the plots module's
    return path.name


# -- the report -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Section:
    title: str
    lines: list[str]
    claims: list[tuple[str, bool, str]]  # (claim, supported, numbers)


def source_lines(name: str) -> list[str]:
    """The authors' script an experiment follows and its deviations, as the first lines of its section."""
    script, deviations = SOURCES[name]
    lines = [f"Follows the authors' `paper_code/{script}`. Deviations:", ""]
    return lines + [f"- {d}" for d in deviations + COMMON_DEVIATIONS] + [""]


def _table(rows: list[dict], columns: list[str]) -> list[str]:
    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return lines


def _lpf(row: dict) -> str:
    """L/p with its standard error to the error's first digit (4 to 6 decimals); exact values get 5."""
    value, err = row["loss_per_feature"], row["loss_per_feature_stderr"]
    if err == 0:
        return f"{value:.5f} (exact)"
    decimals = min(6, max(4, -math.floor(math.log10(err))))
    return f"{value:.{decimals}f} ± {err:.{decimals}f}"


def _below(a: dict, b: float | dict, sigmas: float = 2.0) -> bool:
    """a's L/p is below b (a number or another row) by more than `sigmas` combined standard errors."""
    b_value, b_err = (b, 0.0) if isinstance(b, float) else (b["loss_per_feature"], b["loss_per_feature_stderr"])
    return a["loss_per_feature"] + sigmas * math.hypot(a["loss_per_feature_stderr"], b_err) < b_value


# "No better than naive" is a claim about effect size: the mixing matrices the paper studies gain 10-20%
# over naive, so a model within 1% of it (beyond 2 standard errors) counts as no better.
NO_BETTER_WITHIN = 0.01


def _no_better(a: dict, reference: float) -> bool:
    """a's L/p is not below (1 - NO_BETTER_WITHIN) x reference by more than 2 standard errors."""
    return not _below(a, (1 - NO_BETTER_WITHIN) * reference)


def _crossover(rows_by_p: list[dict], naive_lpf: float) -> tuple[str, bool, str] | None:
    """The claim 'beats naive at small evaluation p, loses to it at large p' for one model's results_by_p rows."""
    if len(rows_by_p) < 2:
        return None
    rows = sorted(rows_by_p, key=lambda r: r["eval_p"])
    small, large = rows[0], rows[-1]
    naive = {"loss_per_feature": naive_lpf, "loss_per_feature_stderr": 0.0}
    return (
        "the trained model beats the naive loss at small p and loses to it at large p",
        _below(small, naive_lpf) and _below(naive, large),
        f"evaluated at p = {small['eval_p']:g}: {_lpf(small)}; at p = {large['eval_p']:g}: {_lpf(large)}; "
        f"naive {naive_lpf:.4f}",
    )


def sigma_sweep(runs: list[Run], figures: Path) -> Section:
    naive = naive_of(runs)
    rows = [r for run in runs if run.model == "MLP" for r in run.results]
    lines, claims = source_lines("sigma_sweep"), []
    fig = plots.loss_against_sigma_figure(rows, naive)
    lines.append(f"![L/p against sigma]({_save(fig, _png(figures, 'sigma_sweep'))})")
    best = {}
    for symmetric in (True, False):
        subset = sorted(
            (r for r in rows if str(r.get("mixing.symmetric")) == str(symmetric)), key=lambda r: r["configured_sigma"]
        )
        if not subset:
            continue
        low = min(subset, key=lambda r: r["loss_per_feature"])
        best[symmetric] = low
        lines.append(
            f"- {'symmetric' if symmetric else 'asymmetric'} M: L/p = {_lpf(subset[0])} at sigma = 0, minimum "
            f"{_lpf(low)} at sigma = {low['configured_sigma']:.3f}, {_lpf(subset[-1])} at sigma = "
            f"{subset[-1]['configured_sigma']:.3f}"
        )
    if True in best:
        sym = sorted((r for r in rows if str(r.get("mixing.symmetric")) == "True"), key=lambda r: r["configured_sigma"])
        low = best[True]
        shape = _below(low, sym[0]) and _below(low, sym[-1])
        claims.append(
            (
                "The advantage grows with sigma up to an optimum and then shrinks",
                shape,
                f"symmetric: {_lpf(sym[0])} (sigma 0) > {_lpf(low)} (sigma {low['configured_sigma']:.3f}) "
                f"< {_lpf(sym[-1])} (sigma {sym[-1]['configured_sigma']:.3f})",
            )
        )
    if True in best and False in best:
        claims.append(
            (
                "Asymmetric noise helps less than symmetric",
                _below(best[True], best[False]),
                f"best L/p symmetric {_lpf(best[True])} vs asymmetric {_lpf(best[False])}",
            )
        )
    return Section("Sigma sweep (`sigma_sweep.yaml`)", lines, claims)


def _participation(weights: Path | None) -> list[float]:
    """Mean over neurons of the participation ratio of |W_in| rows: ~1 when a neuron reads one feature."""
    if weights is None or not weights.is_file():
        return []
    w_in = read_checkpoint(weights, field="report", lightning=False)["network"]["w_in"].double()
    w2 = w_in.pow(2)
    ratio = w2.sum(-1).pow(2) / w2.pow(2).sum(-1).clamp_min(1e-30)  # (K, h)
    return ratio.mean(-1).tolist()


def sparsity_regimes(runs: list[Run], figures: Path) -> Section:
    naive = naive_of(runs)
    run = next((r for r in runs if r.model == "MLP"), None)
    lines, claims = source_lines("sparsity_regimes"), []
    if run is None:
        return Section("Sparsity regimes (`sparsity_regimes.yaml`)", ["(no run)"], [])
    fig = plots.loss_against_eval_p_figure(run.results_by_p, run.results, naive, ylim=(0, 0.2))
    lines.append(f"![L/p against evaluation p]({_save(fig, _png(figures, 'sparsity_regimes'))})")
    spread = _participation(run.weights)
    rows = sorted(run.results, key=lambda r: r["p"])
    for row, pr in zip(
        rows if spread else [], [spread[int(r["instance"])] for r in rows] if spread else [], strict=True
    ):
        row["features_per_neuron"] = pr
    lines += _table(
        rows,
        ["p", "loss_per_feature", "loss_per_feature_stderr", "naive_loss_per_feature"]
        + (["features_per_neuron"] if spread else []),
    )
    lines.append("")
    lines.append(
        "features_per_neuron: participation ratio (sum w^2)^2 / sum w^4 of each neuron's input weights, "
        "averaged; 1 = one feature per neuron."
    )
    sparse, dense = rows[0], rows[-1]
    crossover = _crossover([r for r in run.results_by_p if r["p"] == sparse["p"]], naive)
    if crossover:
        label = f"{sparse.get('mixing', '?')} M (sigma {sparse.get('sigma', float('nan')):g})"
        claims.append((f"Trained at p = {sparse['p']:g} with the {label}, {crossover[0]}", *crossover[1:]))
    if spread:
        claims.append(
            (
                "Sparse-trained models spread every feature over many neurons; dense-trained ones use about one "
                "feature per neuron",
                sparse["features_per_neuron"] > 2 * dense["features_per_neuron"],
                f"features per neuron: {sparse['features_per_neuron']:.1f} at p = {sparse['p']:g}, "
                f"{dense['features_per_neuron']:.1f} at p = {dense['p']:g}",
            )
        )
    return Section("Sparsity regimes (`sparsity_regimes.yaml`)", lines, claims)


EMBEDDING_SIGNS_NOTE = (
    "embedding(WWt-I) is the authors' M = W_E W_E^T - I, the one their figure shows; embedding(I-WWt) is "
    "I - W_E W_E^T, the mixing matrix the residual model actually adds (docs/derivation.md). They are "
    "negatives of each other: the eigenvalues of (M + M^T)/2 change sign, so the directions that the "
    "labels amplify in one are the ones they shrink in the other, and a 50-neuron ReLU MLP can exploit "
    "the two to different degrees."
)


def mixing_comparison(runs: list[Run], figures: Path) -> Section:
    naive = naive_of(runs)
    run = next((r for r in runs if r.model == "MLP"), None)
    if run is None:
        return Section("Mixing matrices (`mixing_comparison.yaml`)", ["(no run)"], [])
    lines = source_lines("mixing_comparison")
    lines += _table(
        run.results,
        ["mixing", "learn_sigma", "sigma", "configured_sigma", "p", "loss_per_feature", "loss_per_feature_stderr"],
    )
    lines += [
        "",
        "sigma is the learned value where learn_sigma (configured_sigma its start).",
        "",
        EMBEDDING_SIGNS_NOTE,
    ]
    if run.results_by_p:
        fig, ax = _figure()
        for mixing in dict.fromkeys(r["mixing"] for r in run.results_by_p):
            plots.loss_errorbars(
                ax, [r for r in run.results_by_p if r["mixing"] == mixing], "eval_p", mixing, marker="."
            )
        plots.naive_line(ax, naive)
        ax.set(xscale="log", xlabel="evaluation p", ylabel="L / p", title="Trained at p = 0.01, by mixing matrix")
        ax.legend(fontsize=7)
        lines.append(f"![L/p by mixing]({_save(fig, _png(figures, 'mixing_comparison'))})")
    by = {r["mixing"]: r for r in run.results}
    claims = []
    for mixing in ("embedding(WWt-I)", "embedding(I-WWt)", "gaussian(sym)"):
        crossover = _crossover([r for r in run.results_by_p if r["mixing"] == mixing], naive)
        if crossover:
            claims.append((f"With the {mixing} M (trained at p = 0.01), {crossover[0]}", *crossover[1:]))
    for embedding in ("embedding(WWt-I)", "embedding(I-WWt)"):
        if "none" in by and embedding in by:
            clean, embed = by["none"], by[embedding]
            claims.append(
                (
                    f"With M = 0 the trained model is no better than naive (within {NO_BETTER_WITHIN:.0%}) at small "
                    f"p; with the {embedding} M it beats naive",
                    _no_better(clean, naive) and _below(embed, naive),
                    f"p = 0.01: clean {_lpf(clean)}, {embedding} {_lpf(embed)}, naive {naive:.4f}",
                )
            )
    if "gaussian(sym)" in by and "gaussian" in by:
        claims.append(
            (
                "Asymmetric noise helps less than symmetric (learned sigma)",
                _below(by["gaussian(sym)"], by["gaussian"]),
                f"symmetric {_lpf(by['gaussian(sym)'])} vs asymmetric {_lpf(by['gaussian'])}",
            )
        )
    return Section("Mixing matrices (`mixing_comparison.yaml`)", lines, claims)


def eigen_alignment(runs: list[Run], figures: Path) -> Section:
    from cis_lightning.analysis import eigen_alignment as eigen_cos
    from cis_lightning.analysis import entry_fit, svd_alignment

    run = next((r for r in runs if r.model == "MLP" and r.weights is not None and r.weights.is_file()), None)
    if run is None:
        return Section("Eigen-subspace alignment (`eigen_alignment.yaml`)", ["(no run)"], [])
    state = read_checkpoint(run.weights, field="report", lightning=False)
    w_in, w_out = state["network"]["w_in"], state["network"]["w_out"]
    m = state["task"]["sigma"].abs()[:, None, None] * state["task"]["mixing"]
    cos_eig, cos_svd = eigen_cos(w_in, w_out, m)[0], svd_alignment(w_in, w_out, m)[0]
    fit = entry_fit(w_in, w_out, m)
    h = w_in.shape[1]
    fig, ax = _figure()
    ax.plot(range(len(cos_eig)), cos_eig.tolist(), ".", label="cos(E_i, W_out W_in E_i), eigenvectors of (M+M^T)/2")
    ax.plot(range(len(cos_svd)), cos_svd.tolist(), ".", label="cos(U_i, W_out W_in V_i), SVD of I + M")
    ax.axvline(h - 0.5, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="index i (descending eigen- / singular value)", ylabel="cosine", title="Eigen-subspace alignment")
    ax.legend(fontsize=6)
    lines = source_lines("eigen_alignment")
    lines += [f"![alignment]({_save(fig, _png(figures, 'eigen_alignment'))})", ""]
    lines += _table(run.results, ["mixing", "sigma", "p", "loss_per_feature", "loss_per_feature_stderr"])
    summary = {
        name: (cos[:h].mean().item(), cos[h:].mean().item()) for name, cos in (("eig", cos_eig), ("svd", cos_svd))
    }
    lines += [
        "",
        f"Mean cosine over i < {h} and i >= {h}: eigenvectors {summary['eig'][0]:.3f} / {summary['eig'][1]:.3f}; "
        f"singular vectors {summary['svd'][0]:.3f} / {summary['svd'][1]:.3f}.",
        "",
        f"Entries of W_out W_in against sigma M: off-diagonal slope through 0 {fit.offdiag_slope[0].item():.3f} "
        f"(correlation {fit.offdiag_correlation[0].item():.3f}); diagonal line: slope {fit.diag_slope[0].item():.3f}, "
        f"intercept {fit.diag_intercept[0].item():.3f}.",
    ]
    top, rest = summary["eig"]
    claims = [
        (
            "W_out W_in captures the top ~d_mlp eigenvectors of the symmetric part of M and ignores the rest",
            top > rest + 0.3,
            f"mean cos over i < {h}: {top:.3f}; over i >= {h}: {rest:.3f}",
        )
    ]
    return Section("Eigen-subspace alignment (`eigen_alignment.yaml`)", lines, claims)


def offset_baseline(runs: list[Run], figures: Path) -> Section:
    naive = naive_of(runs)
    offset = next((r for r in runs if r.model == "NaiveOffset"), None)
    trained = next((r for r in runs if r.model == "MLP"), None)
    lines, claims = source_lines("offset_baseline"), []
    if offset is None:
        return Section("Naive + offset (`offset_baseline.yaml`)", ["(no run)"], [])
    rows = sorted(offset.results, key=lambda r: r["p"])
    if trained:
        by_p = {r["p"]: r for r in trained.results}
        for row in rows:
            if row["p"] in by_p:
                row["trained_loss_per_feature"] = by_p[row["p"]]["loss_per_feature"]
    lines += _table(rows, ["p", "offset", "loss_per_feature", "loss_per_feature_stderr", "trained_loss_per_feature"])
    fig, ax = _figure(6, 3.8)
    for i, p in enumerate(sorted({r["p"] for r in offset.results_by_p})):
        for run, style, label in ((offset, "--", "offset"), (trained, "-", "trained")):
            if run is not None:
                plots.loss_errorbars(
                    ax,
                    [r for r in run.results_by_p if r["p"] == p],
                    "eval_p",
                    f"{label}, p {p:g}",
                    color=f"C{i}",
                    linestyle=style,
                )
    plots.naive_line(ax, naive)
    ax.set(
        xscale="log", xlabel="evaluation p", ylabel="L / p", title="Clean labels: naive + offset (dashed) vs trained"
    )
    ax.set_ylim(0, 0.12)
    ax.legend(fontsize=6, ncol=2)
    lines.append(f"![offset]({_save(fig, _png(figures, 'offset_baseline'))})")
    dense, sparse = rows[-1], rows[0]
    claims.append(
        (
            "Dense-trained models add a small offset for the unrepresented features: the offset scan finds a "
            "positive best offset at p = 1 and none at p <= 0.01",
            dense["offset"] > 0 and all(r["offset"] == 0 for r in rows if r["p"] <= 0.01),
            f"best offset {dense['offset']:.4f} at p = {dense['p']:g} (L/p {_lpf(dense)}"
            + (f", trained {dense.get('trained_loss_per_feature', float('nan')):.4f}" if trained else "")
            + f"), {sparse['offset']:.4f} at p = {sparse['p']:g}",
        )
    )
    if trained:
        small = [r for r in trained.results if r["p"] <= 0.01]
        claims.append(
            (
                f"With M = 0 the trained model is no better than naive (within {NO_BETTER_WITHIN:.0%}) at small p",
                all(_no_better(r, naive) for r in small),
                "; ".join(f"p = {r['p']:g}: {_lpf(r)}" for r in small) + f" (naive {naive:.4f})",
            )
        )
    return Section("Naive + offset (`offset_baseline.yaml`)", lines, claims)


def _variant(run: Run) -> str:
    """A baseline run's legend: its model and, for a factor baseline, its orientation."""
    orientation = run.results[0].get("orientation") if run.results else None
    return f"{run.model} ({orientation})" if orientation else run.model


def semi_nmf(runs: list[Run], figures: Path) -> Section:
    naive = naive_of(runs)
    one_active = [r for r in runs if r.experiment == "semi_nmf"]
    bernoulli = [r for r in runs if r.experiment == "semi_nmf_trained"]
    lines, claims = source_lines("semi_nmf"), []
    by_variant = {_variant(run): run for run in one_active}
    if by_variant:
        fig, ax = _figure()
        for variant, run in by_variant.items():
            plots.loss_errorbars(ax, run.results, "configured_sigma", variant, marker=".")
        plots.naive_line(ax, naive)
        ax.set(xlabel="sigma", ylabel="L / p", title="Exactly one active feature, asymmetric M: baselines")
        ax.legend(fontsize=7)
        lines.append(f"![semi-NMF]({_save(fig, _png(figures, 'semi_nmf'))})")
        table = [
            {
                "model": variant,
                "sigma": row["configured_sigma"],
                "L/p": _lpf(row),
                "reconstruction_error": row.get("reconstruction_error", ""),
            }
            for variant, run in by_variant.items()
            for row in run.results
        ]
        lines += _table(
            sorted(table, key=lambda r: (r["sigma"], r["model"])), ["model", "sigma", "L/p", "reconstruction_error"]
        )
        lines += [
            "",
            "(authors): the factors implement I + sigma M^T, as the authors' factor assignment does; (direct): "
            "I + sigma M, what the labels hold. For an asymmetric M only the direct one matches the task.",
            "",
        ]
        for orientation in ("authors", "direct"):
            nmf = by_variant.get(f"SemiNMF ({orientation})")
            if nmf:
                small = [r for r in nmf.results if 0 < r["configured_sigma"] <= 0.02]
                claims.append(
                    (
                        f"The semi-NMF baseline ({orientation} orientation) beats naive for small sigma",
                        all(_below(r, naive) for r in small),
                        "; ".join(f"sigma {r['configured_sigma']:g}: {_lpf(r)}" for r in small),
                    )
                )
    by_bernoulli = {_variant(run): run for run in bernoulli}
    mlp = by_bernoulli.get("MLP")
    if mlp:
        lines += ["", "Bernoulli data at p = 0.01, asymmetric M, sigma 0.01 (`semi_nmf_trained.yaml`):", ""]
        rows = [{**run.results[0], "model": v} for v, run in by_bernoulli.items()]
        lines += _table(rows, ["model", "p", "loss_per_feature", "loss_per_feature_stderr"])
        for orientation in ("authors", "direct"):
            nmf = by_bernoulli.get(f"SemiNMF ({orientation})")
            if nmf:
                claims.append(
                    (
                        f"The trained model beats the semi-NMF baseline ({orientation} orientation) at p = 0.01",
                        _below(mlp.results[0], nmf.results[0]),
                        f"trained {_lpf(mlp.results[0])}, semi-NMF {_lpf(nmf.results[0])}, naive {naive:.4f}",
                    )
                )
    return Section("Semi-NMF baseline (`semi_nmf.yaml`, `semi_nmf_trained.yaml`)", lines, claims)


def rank_by_inner_dimension(rows: list[dict]) -> list[dict]:
    """Rank-study rows grouped by M's inner dimension r: means and standard errors over the seeds."""
    groups = defaultdict(list)
    for row in rows:
        groups[row.get("mixing.rank")].append(row)
    summary = []
    for rank, group in groups.items():
        entry = {"rank": rank, "seeds": len(group)}
        for key in ("mixing_effective_rank", "loss_per_feature", "sigma"):
            values = [float(r[key]) for r in group]
            mean = sum(values) / len(values)
            spread = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
            entry |= {key: mean, f"{key}_sem": spread / math.sqrt(len(values))}
        summary.append(entry)
    return sorted(summary, key=lambda e: -e["mixing_effective_rank"])


def rank_study(runs: list[Run], figures: Path) -> Section:
    naive = naive_of(runs)
    run = next((r for r in runs if r.model == "MLP"), None)
    if run is None:
        return Section("Rank study (`rank_study.yaml`)", ["(no run)"], [])
    rows = sorted(run.results, key=lambda r: r["mixing_effective_rank"])
    fig = plots.loss_and_sigma_against_rank_figure(rows, naive)
    lines = source_lines("rank_study")
    lines += [f"![rank study]({_save(fig, _png(figures, 'rank_study'))})", ""]
    summary = rank_by_inner_dimension(rows)
    for entry in summary:
        entry["L/p"] = f"{entry['loss_per_feature']:.4f} ± {entry['loss_per_feature_sem']:.4f}"
        entry["effective rank"] = f"{entry['mixing_effective_rank']:.1f} ± {entry['mixing_effective_rank_sem']:.1f}"
        entry["learned sigma"] = f"{entry['sigma']:.4f} ± {entry['sigma_sem']:.4f}"
    lines += _table(summary, ["rank", "seeds", "effective rank", "L/p", "learned sigma"])
    lines += ["", "Means ± standard errors over the seeds (each seed its own M, data and initialisation)."]
    return Section("Rank study (`rank_study.yaml`)", lines, [])


def training_curves(fit_directory: Path) -> dict[int, tuple[list[int], list[float]]]:
    """Each instance's logged training L / p of a fit (TensorBoard event files): k -> (steps, values)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(fit_directory), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags().get("scalars", []))
    k_all = next(k for k in range(len(tags) + 1) if instance_tag(k) not in tags)
    # A one-instance run logs no per-instance tag: its curve is the run's own.
    by_instance = {k: instance_tag(k) for k in range(k_all)} if k_all else {0: "train/loss_per_feature"}
    curves = {}
    for k, tag in by_instance.items():
        if tag in tags:
            events = accumulator.Scalars(tag)
            curves[k] = ([e.step for e in events], [e.value for e in events])
    return curves


def running_average(values: list[float], window: int = 10) -> list[float]:
    """The mean of the last `window` values at every point (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def transplant(runs: list[Run], figures: Path) -> Section:
    naive = naive_of(runs)
    lines = source_lines("transplant")
    for run in runs:
        lines.append(f"**{run.experiment}** ({run.directory.name}):")
        lines.append("")
        lines += _table(run.results, ["instance", "mixing", "sigma", "loss_per_feature", "loss_per_feature_stderr"])
        lines.append("")
    lines.append(
        "transplant: stage 1, the models trained on their labels. transplant_swapped: the same weights evaluated "
        "on the swapped labels before any fine-tuning. transplant_finetune: after 10,000 steps of fine-tuning there."
    )
    stage1 = next((r for r in runs if r.experiment == "transplant" and r.weights is not None), None)
    stage2 = next((r for r in runs if r.experiment == "transplant_finetune" and r.weights is not None), None)
    if stage1 and stage2:
        first, second = training_curves(stage1.weights.parent), training_curves(stage2.weights.parent)
        if first and second:
            fig, ax = _figure(6, 3.6)
            before = {int(r["instance"]): r["mixing"] for r in stage1.results}
            after = {int(r["instance"]): r["mixing"] for r in stage2.results}
            for k in sorted(set(first) & set(second)):
                (s1, v1), (s2, v2) = first[k], second[k]
                splice = max(s1) + 1
                ax.plot(
                    s1 + [splice + s for s in s2],
                    running_average(v1 + v2),
                    label=f"{before.get(k, k)} -> {after.get(k, '?')}",
                )
                ax.axvline(splice, color="grey", linestyle="--", linewidth=1)
            plots.naive_line(ax, naive)
            ax.set(xlabel="training step", ylabel="training L / p (running average)", title="Transplant")
            ax.set_ylim(0, 0.2)
            ax.legend(fontsize=6)
            lines += ["", f"![transplant]({_save(fig, _png(figures, 'transplant'))})"]
    return Section("Transplant (`transplant.yaml`)", lines, [])


SECTIONS = {
    "sigma_sweep": sigma_sweep,
    "sparsity_regimes": sparsity_regimes,
    "mixing_comparison": mixing_comparison,
    "eigen_alignment": eigen_alignment,
    "offset_baseline": offset_baseline,
    "semi_nmf": semi_nmf,
    "rank_study": rank_study,
    "transplant": transplant,
}


def timing_records(path: Path) -> list[dict]:
    """The invocations recorded in a reproduce.json (older files hold one record, not a list)."""
    data = json.loads(path.read_text())
    return data.get("runs", [data])


def _timing(directories: list[Path]) -> str:
    """What `reproduce` recorded in ROOT/reproduce.json: the commands, their settings and wall times."""
    notes = []
    for directory in directories:
        path = Path(directory) / "reproduce.json"
        if path.is_file():
            for info in timing_records(path):
                timing = ", ".join(f"{k} {v:.0f} s" for k, v in info["seconds"].items())
                work = sum(info["seconds"].values()) / 60
                jobs = info.get("jobs", 1)
                total = (
                    f"{work:.1f} minutes"
                    if jobs == 1
                    else (f"{work:.1f} minutes of work in {info['total_seconds'] / 60:.1f} minutes of wall time")
                )
                notes.append(
                    f"`{info['command']}` ({'fast schedules' if info['fast'] else 'full paper settings'}, "
                    f"{info['threads']} CPU thread(s) per job, {jobs} job(s)): {timing}; {total}."
                )
    if len(notes) <= 1:
        return "".join(f"Produced by {note}" for note in notes)
    return "Produced by:\n\n" + "\n".join(f"- {note}" for note in notes)


def config_of(experiment: str) -> str:
    """The experiment config (its stem) a run's logger name comes from: transplant_finetune -> transplant."""
    return "transplant" if experiment.startswith("transplant") else experiment


def section_of(experiment: str) -> str:
    """The report section a run's experiment (its logger name) belongs to."""
    name = config_of(experiment)
    return "semi_nmf" if name == "semi_nmf_trained" else name


def _json_value(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def report_data(runs: list[Run], claims: list[tuple[str, bool, str, str]]) -> dict:
    """The report's numbers, machine-readable: rows by experiment (its config's stem) and the claims.

    Every row names its run (`experiment`: the logger name, e.g. transplant_finetune) and model.
    """
    experiments: dict[str, dict] = {}
    for run in runs:
        name = config_of(run.experiment)
        entry = experiments.setdefault(name, {"config": f"{CONFIGS}/{name}.yaml", "rows": [], "rows_by_p": []})
        for key, rows in (("rows", run.results), ("rows_by_p", run.results_by_p)):
            entry[key] += [{"experiment": run.experiment} | {k: _json_value(v) for k, v in row.items()} for row in rows]
    return {
        "experiments": experiments,
        "claims": [{"claim": c, "reproduced": bool(ok), "numbers": n, "section": t} for c, ok, n, t in claims],
    }


def write_report(directories: list[Path], output: Path, preamble: str = "") -> Path:
    """Collect every results.csv under `directories` into `output` (Markdown) and PNGs beside it."""
    preamble = preamble or _timing(directories)
    runs = find_runs(directories)
    groups = defaultdict(list)
    for run in runs:
        groups[section_of(run.experiment)].append(run)
    figures = output.parent / output.stem
    sections = [SECTIONS[name](groups[name], figures) for name in SECTIONS if groups.get(name)]
    unknown = sorted(set(groups) - set(SECTIONS))
    lines = ["# Reproducing Bhagat et al. (2026): measured results", ""]
    if preamble:
        lines += [preamble, ""]
    claims = [(claim, ok, numbers, s.title) for s in sections for claim, ok, numbers in s.claims]
    if claims:
        lines += [
            "## The paper's claims",
            "",
            "| claim | reproduced here | numbers (L/p ± stderr) | from |",
            "|---|---|---|---|",
        ]
        lines += [f"| {c} | {'yes' if ok else '**no**'} | {n} | {t} |" for c, ok, n, t in claims]
        lines.append("")
    for section in sections:
        lines += [f"## {section.title}", ""]
        for line in section.lines:  # a figure is its own paragraph, never the last row of a table
            lines += ["", line, ""] if line.startswith("![") else [line]
        lines.append("")
    for name in unknown:
        for run in groups[name]:
            lines += [f"## {name} ({run.model})", ""]
            lines += _table(
                run.results,
                ["instance", "model", "mixing", "sigma", "p", "loss_per_feature", "loss_per_feature_stderr"],
            )
            lines.append("")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")
    output.with_suffix(".json").write_text(json.dumps(report_data(runs, claims), indent=1) + "\n")
    return output


def main(args: list[str] | None = None) -> None:
    """`cis report RUN_DIR... [--output F]`."""
    args = list(sys.argv[1:] if args is None else args)
    parser = argparse.ArgumentParser(
        prog="cis report", description="collect results.csv files into one Markdown report"
    )
    parser.add_argument("directories", nargs="+", type=Path)
    parser.add_argument("--output", type=Path, default=Path("report.md"))
    options = parser.parse_args(args[1:] if args and args[0] == "report" else args)
    missing = [str(d) for d in options.directories if not d.is_dir()]
    if missing:
        fail(f"report: no such run directory: {', '.join(missing)}")
    check_output(options.output)
    if not any(any(d.rglob("results.csv")) for d in options.directories):
        names = ", ".join(map(str, options.directories))
        fail(f"report: no results.csv under {names}: give run directories that `cis test` wrote results into")
    try:
        print(f"report: {write_report(options.directories, options.output)}")
    except ConfigError as error:
        fail(f"report: {error}")
    except OSError as error:
        fail(f"report: {error.filename or options.output}: {error.strerror or error}")


def check_output(output: Path) -> None:
    """One line, before any work, for an --output that is a directory or cannot be written."""
    if output.is_dir():
        fail(f"--output: {output} is a directory: give a file name, e.g. {output / 'report.md'}")
    existing = next(p for p in output.parents if p.exists())
    if not existing.is_dir():
        fail(f"--output: {output} lies under {existing}, which is a file")
    try:
        check_writable_directory(output.parent, "--output")
    except ConfigError as error:
        fail(str(error))


def fail(message: str) -> None:
    """One line on stderr naming the problem, exit status 2 (bad input); for `cis report` and `cis reproduce`."""
    print(f"cis: error: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
