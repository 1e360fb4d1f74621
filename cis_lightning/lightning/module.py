"""LightningModule: trains K instances of a CCModel on the data module's task."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from cis_lightning.backends import check_loss_backend, fast_path_problem, training_loss
from cis_lightning.core.errors import ConfigError, require
from cis_lightning.core.loss import mean_loss
from cis_lightning.core.mixing import effective_rank
from cis_lightning.core.models import CCModel
from cis_lightning.core.task import Stream, Task, nonempty_steps, training_instances
from cis_lightning.evaluation import (
    StrataPlan,
    StratifiedLossPerFeature,
    draw_losses,
    evaluate_at,
    exact_losses,
    exact_strata,
    naive_loss_per_feature,
    stratum_moments,
)
from cis_lightning.evaluation.readout import ReadoutForm, readout_form
from cis_lightning.lightning.datamodule import EvalBatch
from cis_lightning.runs.loading import read_checkpoint, save_atomically
from cis_lightning.runs.results import RESULTS, RESULTS_BY_P, format_results, instance_tag, write_results

_NEVER = torch.iinfo(torch.int64).max
# Device types whose tensors Python reads without waiting for a device (`_watch_finite`).
HOST_DEVICES = ("cpu",)


class TrainingDiverged(RuntimeError):
    """A loss or weight became NaN or infinite; the message names the step and the instances."""


class CCModule(pl.LightningModule):
    """AdamW with cosine annealing per step to 0 over max_steps (the paper's defaults).

    The loss is the sum over instances of each instance's mean squared error, so every instance
    gets exactly the gradient it would get alone.

    `equal_nonempty_samples`: the paper trains a model at sparsity p for base / q steps,
    q = 1 - (1 - p)^n, so that every p sees the same number of non-empty samples. With instances of
    different p in one run, instance k trains for T_k = max_steps * q_min / q_k steps
    (`task.nonempty_steps`) with its own cosine schedule lr_k(t) = lr (1 + cos(pi t / T_k)) / 2 and
    is frozen from step T_k on (learning rate 0: AdamW then leaves it exactly unchanged, weight
    decay included). The sparsest instance runs the whole max_steps; instance k is the same model
    as a one-instance run with max_steps = T_k. A frozen instance's training batches are empty (it
    draws nothing, and the run's draw follows the densest instance still training), and the logged
    train/loss averages over the instances still training; a run of K > 1 instances also logs each
    instance's training L / p as train/loss_per_feature/instance_k (`instance_tag`).

    `init_from`: a checkpoint (Lightning .ckpt or weights.pt) whose network weights initialise this
    network before any stage (a resumed or tested checkpoint still overrides them); for fine-tuning
    a trained model on other data (the paper's transplant experiment).

    `test_feature_probabilities`: `cis test` also evaluates every instance at each of these p (the
    paper's L / p against evaluation p) and writes results_by_p.csv (rank zero, `evaluate_at`: every
    p from one set of stratum draws).

    `compile`: run the training loss through torch.compile (worth it on a GPU, where a step costs
    kernel launches; the first step then takes tens of seconds to compile).

    `loss_backend`: how the training loss and its gradients are computed (`cis_lightning.backends`):
    "reference" differentiates the network's own `forward` with autograd; "fast" runs the same loss
    with its backward written out (a bias-free one-layer network on sparse float32 batches in one CPU
    process, no compile; elsewhere it is refused); "auto" (default) takes fast where it applies and
    reference elsewhere. Evaluation always runs the network's `forward`.

    `threads`: torch's intra-op threads while training (validation and test keep the process's own,
    and the process gets its own back when fit ends or fails). None leaves torch's setting as it is.

    `sigma_lr`, `sigma_weight_decay`: the learning rate and weight decay of a learned sigma
    (data.learn_sigma; None: `lr` and `weight_decay`), in its own param group of the same AdamW,
    annealed by the same cosine (and per-instance schedule). The authors train sigma in the weights'
    AdamW, decay included (`paper_code/mlpinsoup.py`, `train`): the defaults do the same. Adam
    moves a parameter by about its learning rate per step whatever its gradient's scale, so at
    lr = 3e-3 a sigma of 0.03 falls below 0.008 within 25 steps, before the network uses M; for a
    Gaussian M it recovers only after thousands of steps (docs/derivation.md, "Learned sigma"). A smaller
    sigma_lr keeps sigma near its value while the network learns.
    """

    def __init__(
        self,
        network: CCModel,
        lr: float = 3e-3,
        weight_decay: float = 1e-2,
        equal_nonempty_samples: bool = False,
        init_from: str | None = None,
        test_feature_probabilities: list[float] | None = None,
        compile: bool = False,
        sigma_lr: float | None = None,
        sigma_weight_decay: float | None = None,
        threads: int | None = None,
        loss_backend: str = "auto",
    ):
        super().__init__()
        require(
            isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0,
            "model.lr",
            f"must be a number > 0, got {lr!r}",
        )
        require(
            isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0,
            "model.weight_decay",
            f"must be a number >= 0, got {weight_decay!r}",
        )
        require(
            sigma_lr is None or (isinstance(sigma_lr, (int, float)) and math.isfinite(sigma_lr) and sigma_lr > 0),
            "model.sigma_lr",
            f"must be a number > 0 or null (the model's lr), got {sigma_lr!r}",
        )
        require(
            sigma_weight_decay is None
            or (
                isinstance(sigma_weight_decay, (int, float))
                and math.isfinite(sigma_weight_decay)
                and sigma_weight_decay >= 0
            ),
            "model.sigma_weight_decay",
            f"must be a number >= 0 or null (the model's weight_decay), got {sigma_weight_decay!r}",
        )
        require(
            threads is None or (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1),
            "model.threads",
            f"must be an integer >= 1 or null (torch's setting), got {threads!r}",
        )
        self.threads = threads
        self._threads_outside: int | None = None  # torch's threads before training set its own
        self.network = network
        self.lr = lr
        self.sigma_lr = lr if sigma_lr is None else sigma_lr
        self.weight_decay = weight_decay
        self.sigma_weight_decay = weight_decay if sigma_weight_decay is None else sigma_weight_decay
        self._some_sigma_fixed = False  # some instances learn sigma, others keep theirs (configure_optimizers)
        self.equal_nonempty_samples = equal_nonempty_samples
        self._steps_for: tuple[int | None, list[int]] = (None, [])  # (max_steps, T_k): `instance_steps`
        self.init_from = init_from
        for q in test_feature_probabilities or []:
            require(0 < q <= 1, "model.test_feature_probabilities", f"every p must be in (0, 1], got {q}")
        self.test_feature_probabilities = list(test_feature_probabilities or [])
        self.task: Task | None = None
        self._eval_metric: StratifiedLossPerFeature | None = None
        self._eval_form: ReadoutForm | None = None
        # compile: the training loss (forward and backward) through torch.compile, compiled on the
        # first step. The sampler stays eager (inductor cannot print SplitMix64's 64-bit constants).
        require(isinstance(compile, bool), "model.compile", f"must be true or false, got {compile!r}")
        self.compile = compile
        self.loss_backend = check_loss_backend(loss_backend)
        # The reference until fit's setup has the trainer to choose with (`_choose_training_loss`).
        self.training_backend = "reference"  # the backend training steps run: "reference" or "fast"
        self._training_loss = torch.compile(mean_loss, dynamic=False) if compile else mean_loss

    def setup(self, stage: str) -> None:
        # The data module owns the task (inputs, M, sigma); the module holds it so that the
        # optimizer trains a learned sigma and checkpoints carry M and sigma.
        datamodule = self.trainer.datamodule
        require(datamodule is not None and hasattr(datamodule, "task"), "data", "cis_lightning needs a CCDataModule")
        self.task = datamodule.task
        require(
            self.task.n_features == self.network.n_features and self.task.n_instances == self.network.n_instances,
            "model.network",
            f"has {self.network.n_instances} instances of {self.network.n_features} features, the data "
            f"{self.task.n_instances} of {self.task.n_features}",
        )
        if stage == "fit":
            require(
                any(p.requires_grad for p in self.network.parameters()),
                "model.network",
                f"{type(self.network).__name__} has no trainable parameters (a hand-made baseline): evaluate it "
                "with `cis test --config ...`, no fit needed",
            )
        if self.init_from:
            try:
                self.network.load_state_dict(_network_weights(self.init_from))
            except RuntimeError as error:  # other shapes or names: one line, no traceback
                problem = " ".join(str(error).split())[:300]
                raise ConfigError("model.init_from", f"{self.init_from} does not fit this network: {problem}") from None
        # Hand-made baselines build their weights from the task (M, p) here; trained models ignore it.
        self.network.fit_to(self.task)
        if stage == "fit":
            self._choose_training_loss()
        # Validation and test compute these strata instead of sampling them (homogeneous models: k = 1 too),
        # and allocate the samples of the others by this network's pilot.
        datamodule.exact_strata = exact_strata(self.network)
        datamodule.stratum_moments = self.allocation_pilot

    # -- training -------------------------------------------------------------------------------
    def configure_optimizers(self):
        max_steps = self.trainer.max_steps
        require(
            max_steps is not None and max_steps > 0, "trainer.max_steps", f"must be a positive integer, got {max_steps}"
        )
        groups = [{"params": [p for p in self.network.parameters() if p.requires_grad]}]
        learned = [i.learn_sigma for i in self.task.instances]
        self._some_sigma_fixed = any(learned) and not all(learned)  # `optimizer_step` keeps those as set
        if self.task.sigma.requires_grad:
            # CosineAnnealingLR scales each group from its own initial lr; optimizer_step's
            # per-instance factor lr_k(t) / lr(t) is the same for both groups.
            sigma_group = {"params": [self.task.sigma], "lr": self.sigma_lr, "weight_decay": self.sigma_weight_decay}
            groups.append(sigma_group)
        # torch's fused AdamW: one kernel for all parameters (torch >= 2.4 on CPU and CUDA).
        optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay, fused=True)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_steps, eta_min=0.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def instance_steps(self) -> list[int]:
        """T_k, the steps instance k trains for: max_steps, or `nonempty_steps` when equal_nonempty_samples."""
        max_steps = self.trainer.max_steps
        if not self.equal_nonempty_samples or self.task.exactly_one_active:
            return [max_steps] * self.task.n_instances
        if self._steps_for[0] != max_steps:  # asked every step: kept per max_steps
            ps = [i.feature_probability for i in self.task.instances]
            self._steps_for = (max_steps, nonempty_steps(max_steps, ps, self.task.n_features))
        return self._steps_for[1]

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        sigma = self.task.sigma
        # sigma is one (K,) parameter; where only some instances learn theirs, AdamW's decoupled weight
        # decay would still shrink the fixed entries (their gradient is 0, their decay is not): put
        # them back after the step, so that a fixed sigma stays exactly as configured.
        kept = sigma.detach().clone() if self._some_sigma_fixed else None
        self._step_each_instance(epoch, batch_idx, optimizer, optimizer_closure)
        if kept is not None:
            with torch.no_grad():
                sigma.copy_(torch.where(self.task.learn_sigma, sigma, kept))

    def _step_each_instance(self, epoch, batch_idx, optimizer, optimizer_closure) -> None:
        steps = self.instance_steps()
        if len(set(steps)) == 1:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # AdamW's update is linear in the learning rate (decay and step both scale with it), so
        # scaling instance k's update by lr_k(t) / lr(t) is AdamW with instance k's own schedule.
        t = self.global_step
        shared = optimizer.param_groups[0]["lr"] / self.lr  # the shared cosine at step t, > 0 for t < max_steps
        own = [(1 + math.cos(math.pi * t / t_k)) / 2 if t < t_k else 0.0 for t_k in steps]
        factor = torch.tensor(own, device=self.device) / shared
        params = [p for group in optimizer.param_groups for p in group["params"]]
        before = [p.detach().clone() for p in params]
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        with torch.no_grad():
            for p, old in zip(params, before, strict=True):  # every parameter has the instance axis first
                p.copy_(torch.lerp(old, p, factor.view(-1, *[1] * (p.dim() - 1)).to(p.dtype)))

    def training_step(self, x: Tensor, batch_idx: int) -> Tensor:
        losses = self._training_loss(self.network, self.task, x)  # (K,)
        self._watch_finite(losses)
        if self._logging_this_step():
            self._stop_if_diverged()
            p = self.task.feature_probability.to(losses)
            training = training_instances(self.instance_steps(), self.global_step)
            if len(training) < self.task.n_instances:  # a frozen instance's batch is empty
                losses, p = losses[training], p[training]
            metrics = {"train/loss": losses.mean(), "train/loss_per_feature": (losses / p).mean()}
            per_instance = {}  # each instance's own curve (the transplant figure splices them)
            if self.task.n_instances > 1:
                per_instance = dict(zip(map(instance_tag, training), (losses / p).unbind(), strict=True))
            if self.task.sigma.requires_grad:
                metrics["train/sigma"] = self.task.sigma_value().mean()
            self._log_training(metrics, per_instance)
        return losses.sum()

    def _choose_training_loss(self) -> None:
        """The training loss of `loss_backend` for this trainer (the seam, `cis_lightning.backends`)."""
        trainer = self.trainer
        problem = fast_path_problem(
            self.network,
            self.task,
            trainer.strategy.root_device,
            world_size=trainer.world_size,
            precision=str(trainer.precision),
            compiled=self.compile,
        )
        loss = training_loss(self.loss_backend, problem)
        self.training_backend = "reference" if loss is mean_loss else "fast"
        self._training_loss = torch.compile(loss, dynamic=False) if self.compile else loss

    def _logging_this_step(self) -> bool:
        """Log on every `trainer.log_every_n_steps`-th step only, so that the other steps make no host sync."""
        every = self.trainer.log_every_n_steps
        return every > 0 and ((self.global_step + 1) % every == 0 or self.trainer.should_stop)

    def _log_training(self, own: dict[str, Tensor], per_instance: dict[str, Tensor]) -> None:
        """Write the training metrics of this step to the loggers now, at step index global_step.

        Through the logger API rather than self.log, which hands them to the loggers only after the
        batch's checkpoint (`RunCheckpoint`) was written: a kill in between would lose the step."""
        metrics = own | per_instance  # each instance's curve goes to the loggers only
        numbers = torch.stack([value.detach().double() for value in metrics.values()]).tolist()  # one host sync
        values = dict(zip(metrics, numbers, strict=True))
        for logger in self.loggers:
            logger.log_metrics(values, step=self.global_step)
        for name, value in values.items():  # callbacks and the progress bar still see them
            if name in own:
                self.log(name, value, on_step=True, logger=False)

    # -- threads --------------------------------------------------------------------------------
    def training_threads(self) -> int | None:
        """torch's threads for training steps (`threads`; None: leave torch's setting)."""
        return self.threads

    def _use_training_threads(self) -> None:
        threads = self.training_threads()
        if threads is not None and threads != torch.get_num_threads():
            if self._threads_outside is None:
                self._threads_outside = torch.get_num_threads()
            torch.set_num_threads(threads)

    def restore_threads(self) -> None:
        """torch's threads as they were before training set its own (after fit, and when it fails)."""
        if self._threads_outside is not None:
            torch.set_num_threads(self._threads_outside)
            self._threads_outside = None

    def on_validation_start(self) -> None:
        self.restore_threads()

    def on_validation_end(self) -> None:
        if self.trainer.state.fn == "fit":  # a validation inside fit: back to the training threads
            self._use_training_threads()

    # -- divergence -----------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self._use_training_threads()
        steps = self.instance_steps()
        self.trainer.datamodule.train_steps = steps if len(set(steps)) > 1 else None
        # The step at which each instance's loss was first non-finite (_NEVER: not yet). A device
        # tensor updated every step without a host sync, read only where the host syncs anyway:
        # logging steps, checkpoints and the end of training.
        self._first_nonfinite = torch.full((self.task.n_instances,), _NEVER, dtype=torch.long, device=self.device)
        self._stop_if_diverged(check_weights=True)  # a start that is not finite (a resumed state, a learned sigma)

    def _watch_finite(self, losses: Tensor) -> None:
        if getattr(self, "_first_nonfinite", None) is None:  # a training step outside fit()
            return
        # Where the loss runs on the host, reading the K losses waits for no device: a look at them
        # in Python, and the three operations below only on a non-finite step.
        if losses.device.type in HOST_DEVICES and all(map(math.isfinite, losses.tolist())):
            return
        first = self._first_nonfinite  # steps only grow, so min(first, step) keeps the earliest
        self._first_nonfinite = torch.where(torch.isfinite(losses.detach()), first, first.clamp(max=self.global_step))

    def _stop_if_diverged(self, check_weights: bool = False) -> None:
        """TrainingDiverged if a loss (or, with check_weights, a weight) is not finite, on every rank alike."""
        if getattr(self, "_first_nonfinite", None) is None:
            return
        k = self.task.n_instances
        first = self.all_gather(self._first_nonfinite).reshape(-1, k).amin(dim=0)  # earliest over ranks
        step = int(first.min())
        if step != _NEVER:
            bad = (first == step).nonzero().flatten().tolist()
            raise TrainingDiverged(self._divergence_message(bad, f"the loss is not finite at step {step}"))
        if check_weights:  # weights are identical on all ranks, so every rank decides alike
            named = list(self.named_parameters())
            finite = torch.stack([torch.isfinite(p.detach().reshape(k, -1)).all(dim=1) for _, p in named])
            bad = (~finite.all(dim=0)).nonzero().flatten().tolist()
            if bad:
                finite_here = finite[:, bad[0]].tolist()
                which = ", ".join(name for (name, _), ok in zip(named, finite_here, strict=True) if not ok)
                # Weights are checked at start, at checkpoints and at the end; the loss, checked every
                # step, names the first step where a non-finite weight is used.
                when = f"after step {self.global_step - 1}" if self.global_step > 0 else "before the first step"
                message = f"the weights ({which}) are not finite {when}"
                raise TrainingDiverged(self._divergence_message(bad, message))

    def _divergence_message(self, instances: list[int], what: str) -> str:
        names = "; ".join(
            f"instance {k} (sigma={i.sigma}, p={i.feature_probability}, seed={i.seed}, mixing={i.mixing.describe()})"
            for k, i in ((k, self.task.instances[k]) for k in instances)
        )
        callback = self.trainer.checkpoint_callback
        last = Path(callback.dirpath) / "last.ckpt" if callback is not None and callback.dirpath else None
        kept = f"the last good checkpoint {last} is kept" if last and last.is_file() else "no checkpoint was saved"
        return f"training diverged: {names}: {what} (model.lr={self.lr}); {kept}"

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Never let a non-finite state overwrite the last good checkpoint.
        self._stop_if_diverged(check_weights=True)

    def leave_training(self) -> None:
        """Undo what training set for itself (torch's threads): fit ended or failed."""
        self.restore_threads()

    def on_train_end(self) -> None:
        self.leave_training()
        self._stop_if_diverged(check_weights=True)

    # -- evaluation -----------------------------------------------------------------------------
    def allocation_pilot(self, plan: StrataPlan, stream: Stream) -> tuple[Tensor, Tensor]:
        """The pilot of a variance allocation (`evaluation.stratum_moments`) of this network: the data
        module's `eval_plan` asks for it when its loader starts, before `on_*_epoch_start`."""
        return stratum_moments(self.network, self.task, plan, stream)

    def _start_eval(self, stream: Stream) -> None:
        plan = self.trainer.datamodule.eval_plan(stream)  # the plan the loader iterates
        exact = exact_losses(self.network, self.task, plan.exact)
        self._eval_metric = StratifiedLossPerFeature(plan, exact).to(self.device)
        self._eval_form = readout_form(self.network, self.task)  # made once per evaluation

    def _eval_step(self, batch: EvalBatch) -> None:
        losses = draw_losses(self.network, self.task, self._eval_form, batch.draw, Stream(batch.stream))
        self._eval_metric.add(batch.draw, losses)

    def _finish_eval(self, prefix: str) -> tuple[Tensor, Tensor]:
        lpf, stderr = self._eval_metric.compute()  # sums over ranks
        self._eval_metric = self._eval_form = None
        self.log(f"{prefix}/loss_per_feature", lpf.mean().float(), sync_dist=False, rank_zero_only=True)
        self.log(f"{prefix}/loss_per_feature_stderr", stderr.mean().float(), rank_zero_only=True)
        self.log(f"{prefix}/naive_loss_per_feature", self.naive_loss_per_feature, rank_zero_only=True)
        if self.task.n_instances > 1:
            for k, value in enumerate(lpf.tolist()):
                self.log(f"{prefix}/loss_per_feature/instance_{k}", value, rank_zero_only=True)
        return lpf, stderr

    @property
    def naive_loss_per_feature(self) -> float:
        return naive_loss_per_feature(self.network.n_features, self.network.n_neurons)

    def on_validation_epoch_start(self) -> None:
        self._start_eval(Stream.VALIDATE)

    def validation_step(self, batch: EvalBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval(Stream.TEST)

    def test_step(self, batch: EvalBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        lpf, stderr = self._finish_eval("test")
        directory = self._output_directory()  # on every rank: trainer.log_dir is a collective under DDP
        self._write_results(self.result_rows(lpf, stderr), directory)
        if self.test_feature_probabilities:
            self._write_results_by_p(directory)

    def _output_directory(self) -> Path:
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    @rank_zero_only
    def _write_results_by_p(self, directory: Path) -> None:
        """One row per (instance, evaluation p): L / p of the trained instance at another sparsity."""
        datamodule, rows = self.trainer.datamodule, []
        results = evaluate_at(
            self.network,
            self.task,
            self.test_feature_probabilities,
            datamodule.eval_nonempty_samples,
            datamodule.eval_batch_size,
        )  # every p from one set of stratum draws
        for q, result in zip(self.test_feature_probabilities, results, strict=True):
            for k, instance in enumerate(self.task.instances):
                row = {"instance": k, "model": type(self.network).__name__, "mixing": self._mixing_label(instance)}
                row |= {"p": instance.feature_probability, "eval_p": q, "sigma": float(self.task.sigma_value()[k])}
                lpf, err = float(result.loss_per_feature[k]), float(result.stderr[k])
                row |= {"loss_per_feature": lpf, "loss_per_feature_stderr": err}
                rows.append(row | self.network.describe_instance(k))
        write_results(directory / RESULTS_BY_P, rows)

    def predict_step(self, x: Tensor, batch_idx: int) -> Tensor:
        return self.network(x)

    def result_rows(self, lpf: Tensor, stderr: Tensor) -> list[dict]:
        """One row per instance: the RESULT_COLUMNS, then every instance setting."""
        rows = []
        for k, instance in enumerate(self.task.instances):
            row = {
                "instance": k,
                "model": type(self.network).__name__,
                "mixing": self._mixing_label(instance),
                # A learned sigma is reported as trained; a fixed one exactly as configured.
                "sigma": float(self.task.sigma_value()[k]) if instance.learn_sigma else instance.sigma,
                "p": instance.feature_probability,
                "seed": instance.seed,
                "loss_per_feature": float(lpf[k]),
                "loss_per_feature_stderr": float(stderr[k]),
                "naive_loss_per_feature": self.naive_loss_per_feature,
            }
            extra = {key: value for key, value in instance.flat().items() if key not in row}
            extra.update(self.network.describe_instance(k))
            extra["mixing_effective_rank"] = float(effective_rank(self.task.mixing[k]))
            extra.update(exactly_one_active=self.task.exactly_one_active, configured_sigma=instance.sigma)
            rows.append(row | extra)
        return rows

    def _mixing_label(self, instance) -> str:
        """The mixing the network is trained with; a residual network adds I - W_E W_E^T itself."""
        if not self.network.residual:
            return instance.mixing.describe()
        return "residual" if instance.mixing.kind == "none" else f"residual+{instance.mixing.describe()}"

    @rank_zero_only
    def _write_results(self, rows: list[dict], directory: Path) -> None:
        write_results(directory / RESULTS, rows)
        print(format_results(rows))
        print(f"results: {directory / RESULTS}")

    # -- final weights --------------------------------------------------------------------------
    def on_fit_end(self) -> None:
        log_dir = self.trainer.log_dir  # on every rank: a collective under DDP
        if self.trainer.is_global_zero and log_dir:
            state = {"network": self.network.state_dict(), "task": self.task.state_dict()}
            save_atomically(state, Path(log_dir) / "weights.pt")


def _network_weights(path: str) -> dict[str, Tensor]:
    """The network's state dict from a Lightning checkpoint or a run's weights.pt, read as data only."""
    state = read_checkpoint(path, field="model.init_from", lightning=False)
    if "state_dict" in state:
        return {k.removeprefix("network."): v for k, v in state["state_dict"].items() if k.startswith("network.")}
    require("network" in state, "model.init_from", f"{path} is neither a Lightning checkpoint nor a weights.pt")
    return state["network"]


__all__ = ["CCModule", "ConfigError", "TrainingDiverged"]
