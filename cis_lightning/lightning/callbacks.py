"""Callbacks that watch the mechanism while the model trains: eigen-subspace alignment, per-feature
loss curves and the paper's figures, in TensorBoard (and as PNG files in the run directory).

Presets in `callbacks/*.yaml` add them to any config: `cis fit --config configs/X.yaml --config
callbacks/analysis.yaml`. All of them are multi-process safe: whatever involves a collective (the
per-feature metric, `evaluate`) runs on every rank; drawing and writing run on rank zero only.
Scalars go to every logger; images and the custom-scalar layout need a TensorBoardLogger and are
skipped without one. Tags carry a `/instance_k` suffix when the run has K > 1 instances.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.figure import Figure
from matplotlib.image import imsave
from torch import Tensor

from cis_lightning import analysis
from cis_lightning.analysis import plots
from cis_lightning.core.errors import check_sizes
from cis_lightning.core.task import Stream, samples_for
from cis_lightning.evaluation import evaluate, evaluation_probability, naive_loss_per_feature
from cis_lightning.runs.results import RESULTS, RESULTS_BY_P, read_results

__all__ = ["EigenAlignment", "Figures", "PerFeatureLoss"]


def _tag(base: str, k: int, n_instances: int) -> str:
    return base if n_instances == 1 else f"{base}/instance_{k}"


def _tensorboard(trainer: pl.Trainer):
    """The SummaryWriter of the first TensorBoardLogger, or None (then images are skipped). Rank zero only."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _run_directory(trainer: pl.Trainer) -> Path:
    """The run's directory (where the module writes results.csv). On every rank: a broadcast under DDP."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def _log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    for logger in trainer.loggers:  # Lightning's loggers write on rank zero only
        logger.log_metrics(metrics, step=step)


@rank_zero_only
def _log_figure(trainer: pl.Trainer, tag: str, fig: Figure, step: int, png: Path | None = None) -> None:
    """Figure -> TensorBoard image `tag` (if a TensorBoardLogger is attached) and optionally a PNG file.

    The figure is rendered once (constrained layout makes drawing the dominant cost) and both
    outputs are written from the same pixels.
    """
    pixels = plots.to_image(fig)  # (H, W, 3) uint8
    if png is not None:
        png.parent.mkdir(parents=True, exist_ok=True)
        imsave(png, pixels)
    writer = _tensorboard(trainer)
    if writer is not None:
        writer.add_image(tag, pixels, step, dataformats="HWC")


class _Checked(pl.Callback):
    """A callback whose integer settings (`SIZES`, attributes of the same names) must be positive.

    Checked in setup rather than __init__: jsonargparse folds an error raised while it builds a list of
    callbacks into a long union-type message, while one raised in setup reaches the CLI as one line.
    """

    SIZES: tuple[str, ...] = ()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        name = type(self).__name__
        check_sizes(**{f"{name}.{size}": getattr(self, size) for size in self.SIZES if getattr(self, size) is not None})


class _WritesLayout:
    """A callback with charts for TensorBoard's custom-scalar dashboard.

    TensorBoard shows only the last layout a run wrote, so every such callback writes the union of
    all of them (read from trainer.callbacks) and whichever writes last writes everything.
    """

    def scalar_layout(self, n_instances: int, n_features: int) -> dict[str, dict[str, list]]:
        raise NotImplementedError

    @rank_zero_only
    def _write_layout(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writer = _tensorboard(trainer)
        if writer is None:
            return
        task = pl_module.task
        layout: dict[str, dict[str, list]] = {}
        for callback in trainer.callbacks:
            if isinstance(callback, _WritesLayout):
                for category, charts in callback.scalar_layout(task.n_instances, task.n_features).items():
                    layout.setdefault(category, {}).update(charts)
        writer.add_custom_scalars(layout)


def _instance_pattern(n_instances: int, k: int) -> str:
    return "$" if n_instances == 1 else f"/instance_{k}$"


class EigenAlignment(_Checked, _WritesLayout):
    """Every `every_n_steps` steps: how well W_out W_in captures the eigenvectors of the total mixing M.

    Scalars `alignment/<name>` from `analysis.alignment_summary` (mean cos(E_i, P E_i) over the top
    d_mlp eigenvectors and over the rest, the same for the SVD of I + M, energy fractions of W_in and
    W_out in the top-d_mlp and positive eigen-subspaces beside the random reference, mean principal
    angles, off-diagonal entry slope, mean diagonal of P), plus `alignment/effective_rank_M` once.
    Every `figure_every_n_steps` steps and at the end: the figure `alignment/figure` (cos_i against i,
    projections W_in E and W_out^T E). The weights are the same on every rank: rank zero computes.
    """

    SIZES = ("every_n_steps", "figure_every_n_steps")

    def __init__(self, every_n_steps: int = 100, figure_every_n_steps: int = 2500):
        self.every_n_steps = every_n_steps
        self.figure_every_n_steps = figure_every_n_steps
        self._last_step = -1
        self._last_figure_step = -1

    def scalar_layout(self, n_instances: int, n_features: int) -> dict[str, dict[str, list]]:
        charts = {}
        for k in range(n_instances):
            end, name = _instance_pattern(n_instances, k), "" if n_instances == 1 else f" (instance {k})"
            charts |= {
                f"cos(E_i, W_out W_in E_i): top d_mlp vs rest{name}": ["Multiline", [rf"alignment/cos_eig_\w+{end}"]],
                f"cos(U_i, W_out W_in V_i): top d_mlp vs rest{name}": ["Multiline", [rf"alignment/cos_svd_\w+{end}"]],
                f"energy in the top-d_mlp eigen-subspace vs random{name}": [
                    "Multiline",
                    [rf"alignment/energy_(in|out|random)_top{end}"],
                ],
                f"energy in the positive eigen-subspace vs random{name}": [
                    "Multiline",
                    [rf"alignment/energy_(in|out|random)_positive{end}"],
                ],
                f"mean principal angle to the top-d_mlp subspace (degrees){name}": [
                    "Multiline",
                    [rf"alignment/angle_(in|out)_deg{end}"],
                ],
            }
        return {"eigen-subspace alignment": charts}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_layout(trainer, pl_module)
        if trainer.is_global_zero:
            task = pl_module.task
            m = analysis.total_mixing(pl_module.network, task)
            ranks = analysis.effective_rank(m).tolist()
            _log_scalars(
                trainer, {_tag("alignment/effective_rank_M", k, len(ranks)): r for k, r in enumerate(ranks)}, 0
            )
        self._log(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0:
            self._log(trainer, pl_module)
        if step % self.figure_every_n_steps == 0:
            self._figures(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module)
        self._figures(trainer, pl_module)

    @torch.no_grad()
    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._last_step:
            return
        self._last_step = step
        w_in, w_out = pl_module.network.effective_weights()
        summary = analysis.alignment_summary(w_in, w_out, analysis.total_mixing(pl_module.network, pl_module.task))
        k_total = w_in.shape[0]
        values = torch.stack(list(summary.values())).cpu().tolist()  # one host transfer for all scalars
        metrics = {
            _tag(f"alignment/{name}", k, k_total): row[k]
            for name, row in zip(summary, values, strict=True)
            for k in range(k_total)
        }
        _log_scalars(trainer, metrics, step)

    @torch.no_grad()
    def _figures(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._last_figure_step:
            return
        self._last_figure_step = step
        w_in, w_out = pl_module.network.effective_weights()
        m = analysis.total_mixing(pl_module.network, pl_module.task)
        for k in range(w_in.shape[0]):
            fig = plots.alignment_figure(w_in[k], w_out[k], m[k], title=f"step {step}")
            _log_figure(trainer, _tag("alignment/figure", k, w_in.shape[0]), fig, step)


class PerFeatureLoss(_Checked, _WritesLayout):
    """L_j / p of every output feature j over training, on fresh samples of the ANALYSIS stream.

    Every `accumulate_every_n_steps` steps it draws one batch (this rank's share of `batch_size`,
    default the training batch) and adds its per-feature squared errors to a torchmetrics metric on
    the device: no host sync. Every `every_n_steps` steps (and at the end) the metric is reduced over
    ranks and logged: `per_feature/feature_<j>` for every j (one multiline chart in the custom-scalar
    dashboard), `per_feature/worst`, `per_feature/best` (with `_index`) and `per_feature/mean`. Every
    `image_every_n_steps` steps and at the end, the image `per_feature/heatmap` (feature x step).

    Fresh samples rather than the training batch: the model has just taken a step on that batch.
    """

    SIZES = ("every_n_steps", "accumulate_every_n_steps", "image_every_n_steps", "batch_size")

    def __init__(
        self,
        every_n_steps: int = 500,
        accumulate_every_n_steps: int = 20,
        image_every_n_steps: int = 2500,
        batch_size: int | None = None,
    ):
        self.every_n_steps = every_n_steps
        self.accumulate_every_n_steps = accumulate_every_n_steps
        self.image_every_n_steps = image_every_n_steps
        self.batch_size = batch_size
        self.steps: list[int] = []
        self.history: list[Tensor] = []  # (K, n) on the host, one per logged step
        self._metric: analysis.FeatureLoss | None = None
        self._updates = 0  # host-side count of updates since the last log
        self._last_image_step = -1

    def scalar_layout(self, n_instances: int, n_features: int) -> dict[str, dict[str, list]]:
        charts = {}
        for k in range(n_instances):
            end, name = _instance_pattern(n_instances, k), "" if n_instances == 1 else f" (instance {k})"
            charts[f"L_j / p of every feature j{name}"] = ["Multiline", [rf"per_feature/feature_\d+{end}"]]
            charts[f"worst, mean and best feature{name}"] = ["Multiline", [rf"per_feature/(worst|mean|best){end}"]]
        return {"per-feature loss": charts}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        task = pl_module.task
        self._metric = analysis.FeatureLoss(evaluation_probability(task), task.n_features).to(pl_module.device)
        self._updates = 0
        self._write_layout(trainer, pl_module)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.accumulate_every_n_steps == 0:
            task = pl_module.task
            batch_size = self.batch_size or trainer.datamodule.batch_size
            x = task.sample(batch_size, step, Stream.ANALYSIS, trainer.global_rank, trainer.world_size)
            self._metric.update(analysis.squared_error(pl_module.network, task, x))
            self._updates += 1
        if step % self.every_n_steps == 0:
            self._log(trainer, pl_module)
        if step % self.image_every_n_steps == 0:
            self._image(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module)
        self._image(trainer, pl_module)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every rank takes the same branch (global_step and _updates agree), so compute()'s all-reduce is safe.
        if self._updates == 0:
            return
        losses = self._metric.compute().float().cpu()  # (K, n), summed over ranks
        self._metric.reset()
        self._updates = 0
        step = trainer.global_step
        self.steps.append(step)
        self.history.append(losses)
        k_total, n = losses.shape
        metrics = {}
        for k in range(k_total):
            row = losses[k]
            metrics |= {
                _tag(f"per_feature/feature_{j:0{len(str(n - 1))}d}", k, k_total): v for j, v in enumerate(row.tolist())
            }
            worst, best = int(row.argmax()), int(row.argmin())
            metrics |= {
                _tag("per_feature/worst", k, k_total): float(row[worst]),
                _tag("per_feature/worst_index", k, k_total): worst,
                _tag("per_feature/best", k, k_total): float(row[best]),
                _tag("per_feature/best_index", k, k_total): best,
                _tag("per_feature/mean", k, k_total): float(row.mean()),
            }
        _log_scalars(trainer, metrics, step)

    def _image(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not self.steps or self.steps[-1] == self._last_image_step:
            return
        self._last_image_step = self.steps[-1]
        history = torch.stack(self.history)  # (T, K, n)
        naive = naive_loss_per_feature(pl_module.network.n_features, pl_module.network.n_neurons)
        for k in range(history.shape[1]):
            fig = plots.feature_heatmap_figure(self.steps, history[:, k], naive)
            _log_figure(trainer, _tag("per_feature/heatmap", k, history.shape[1]), fig, self.steps[-1])

    def state_dict(self) -> dict:
        # Plain tensors and ints: loadable with torch.load(weights_only=True).
        history = torch.stack(self.history) if self.history else torch.zeros(0)
        return {"steps": torch.tensor(self.steps, dtype=torch.int64), "history": history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps = [int(s) for s in state_dict["steps"]]
        self.history = list(state_dict["history"]) if self.steps else []


class Figures(_Checked):
    """The paper's figures for the trained model, at the end of fit and of test, and the sweep's at the end of test.

    All instances in one plot: `figures/loss_against_p` (L / p against the evaluation p on a log grid
    1e-3..1, `n_nonempty` non-empty samples per point, naive line, each model's training p marked).
    Per instance, for the first `max_instances` instances only (a K = 82 sweep gets 5 x 8 images,
    not 5 x 82): `figures/alignment`, `figures/response` (input-output response), `figures/weight_bars`,
    `figures/interference` and `figures/entry_fit` (W_out W_in against M).
    At the end of test, from the run's results.csv and results_by_p.csv (the module writes them in
    on_test_epoch_end, before any on_test_end), the sweep figures that the grid calls for
    (`plots.sweep_figures`; none for one instance): `figures/sweep_sigma` (L / p against sigma, one line
    per mixing kind and symmetry) when sigma varies, `figures/sweep_eval_p` (L / p against the evaluation
    p, one line per instance labelled by its training p) with `model.test_feature_probabilities`,
    `figures/sweep_rank` (L / p and sigma against the effective rank of M) when that rank varies.
    Logged as TensorBoard images and written as `<run directory>/figures/<name>[_instance_k].png`.
    `evaluate` sums its metric over ranks, so every rank evaluates; rank zero draws and writes.
    """

    SIZES = ("n_nonempty", "n_grid", "eval_batch_size", "max_instances")

    def __init__(
        self, n_nonempty: int = 10_000, n_grid: int = 13, eval_batch_size: int = 65536, max_instances: int = 8
    ):
        self.n_nonempty = n_nonempty
        self.n_grid = n_grid
        self.eval_batch_size = eval_batch_size
        self.max_instances = max_instances

    @property
    def grid(self) -> list[float]:
        """The evaluation p: n_grid points log-spaced over [1e-3, 1]."""
        return np.logspace(-3, 0, self.n_grid).tolist()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._draw(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._draw(trainer, pl_module)
        self._draw_sweeps(trainer, pl_module)

    @torch.no_grad()
    def _draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        network, task = pl_module.network, pl_module.task
        k_total = task.n_instances
        curves = None
        if not task.exactly_one_active:  # evaluation p means nothing with exactly one active feature
            curves = [self._evaluate(network, task, [p] * k_total) for p in self.grid]
            at_trained = self._evaluate(network, task, None)
        directory = _run_directory(trainer) / "figures"
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        naive = naive_loss_per_feature(network.n_features, network.n_neurons)
        if curves is not None:
            trained_p = [i.feature_probability for i in task.instances]
            labels = None if k_total == 1 else [f"instance {k} (p={p:.3g})" for k, p in enumerate(trained_p)]
            fig = plots.loss_against_p_figure(self.grid, torch.stack(curves, 1), trained_p, at_trained, naive, labels)
            _log_figure(trainer, "figures/loss_against_p", fig, step, directory / "loss_against_p.png")
        w_in, w_out = network.effective_weights()
        m = analysis.total_mixing(network, task)
        fits = analysis.entry_fit(w_in, w_out, m)
        x, response, target = analysis.input_output_response(network, task)
        plus, minus = analysis.interference(network, task)
        products = analysis.weight_products(w_in, w_out)
        for k in range(min(k_total, self.max_instances)):
            name = "" if k_total == 1 else f"instance {k}"
            fit_k = analysis.EntryFit(*(getattr(fits, f)[k] for f in fits.__dataclass_fields__))
            figures = {
                "alignment": plots.alignment_figure(w_in[k], w_out[k], m[k], title=name),
                "response": plots.response_figure(x, response[k], target[k], title=name),
                "weight_bars": plots.weight_bars_figure(products[k], title=name),
                "interference": plots.interference_figure(plus[k], minus[k], title=name),
                "entry_fit": plots.entry_fit_figure(m[k], w_out[k] @ w_in[k], fit_k, title=name),
            }
            for figure_name, fig in figures.items():
                suffix = "" if k_total == 1 else f"_instance_{k}"
                png = directory / f"{figure_name}{suffix}.png"
                _log_figure(trainer, _tag(f"figures/{figure_name}", k, k_total), fig, step, png)

    def _draw_sweeps(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        directory = _run_directory(trainer)
        if not trainer.is_global_zero:
            return
        rows = read_results(directory / RESULTS)
        # Only this test's own results_by_p.csv: an earlier test in the same directory may have left one.
        rows_by_p = read_results(directory / RESULTS_BY_P) if pl_module.test_feature_probabilities else []
        naive = naive_loss_per_feature(pl_module.network.n_features, pl_module.network.n_neurons)
        for name, fig in plots.sweep_figures(rows, rows_by_p, naive).items():
            _log_figure(trainer, f"figures/{name}", fig, trainer.global_step, directory / "figures" / f"{name}.png")

    def _evaluate(self, network, task, feature_probability: list[float] | None) -> Tensor:
        ps = evaluation_probability(task) if feature_probability is None else feature_probability
        # No batch larger than the samples needed: at large p, n_nonempty samples are enough.
        batch_size = min(self.eval_batch_size, samples_for(self.n_nonempty, task, ps))
        result = evaluate(
            network,
            task,
            n_nonempty=self.n_nonempty,
            batch_size=batch_size,
            stream=Stream.ANALYSIS,
            feature_probability=feature_probability,
        )
        return result.loss_per_feature
