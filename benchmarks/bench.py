"""`make bench`: cis_lightning against a plain PyTorch loop that does what the paper's code does.

Everything runs in one invocation on the same machine, with the same torch thread count:

- training: steps per second of `cis fit` (through `cis_lightning.main.run`, timed by a callback from
  step W to step N, so process start-up and the CLI are excluded) against the reference loop (dense
  `rand < p` mask, dense uniform values, dense matmuls, AdamW, cosine schedule, `loss.item()` each
  step as the paper's loop does), both on the simplified MLP at p = 0.01, batch 2048, n = 100, d_mlp = 50;
- the residual model (d_embed = 1000) against the MLP trained on the same labels (the same math without
  the embedding) and against the MLP on clean labels; K = 16 instances against K = 1, K = 82 in one process;
- the CPU path's C kernels (`cis_lightning.native`) against the numpy and torch forms (`CIS_NATIVE=0`);
- merging single-feature samples in the training loss (`fused.MERGE_SINGLE_FROM`) at K = 16 and at K = 1;
- the training draw through torch.compile (`--data.compile true`) at K = 16, K = 82 and on dense batches;
- evaluation: L / p at p = 0.001 with stderr < 0.5%, stratified and exact (`evaluate`) against the
  paper's brute force (1e6 non-empty samples in dense batches of 100,000); ten instances of p from
  0.001 to 1 with each stratum drawn for the instances it matters to, against drawing it for all;
- Lightning's own loop per step, around a module with one 10-number parameter (its floor under any model);
- peak memory (RSS) of a 10,000-step default run, in a child process.

Medians over repeats after a warm-up; a ratio with a target is also given as the median of the
repeats' ratios of adjacent runs (the reference and the MLP run one after another in every
repeat; the residual model runs between the two MLPs, 3 R times in alternating order), which a drift
of the machine's speed between repeats does not move.
Timings live here, never in the test suite.

    python benchmarks/bench.py [--threads T] [--repeats R] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml

from cis_lightning import fused, native
from cis_lightning.allocator import keep_freed_memory
from cis_lightning.evaluation import evaluate, evaluate_plan, exact_strata, mean_loss_eager, plan_strata
from cis_lightning.main import PROGRESS_BAR_REFRESH, NoProfiler, run
from cis_lightning.mixing import Mixing
from cis_lightning.models import MLP
from cis_lightning.module import automatic_threads
from cis_lightning.optim import AdamW
from cis_lightning.task import Instance, Task

REPO = Path(__file__).resolve().parents[1]
N_FEATURES, D_MLP, BATCH, P = 100, 50, 2048, 0.01


class StepTimer(pl.Callback):
    """Wall time at the start of step `first` and at the end of the last step."""

    def __init__(self, first: int = 50):
        self.first = first
        self.start: float | None = None
        self.stop: float | None = None
        self.steps = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.first:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.stop = time.perf_counter()
        self.steps = trainer.global_step - self.first

    def steps_per_second(self) -> float:
        return self.steps / (self.stop - self.start)


class RssProbe(pl.Callback):
    """Prints the resident set size at a few steps (for the memory run in a child process)."""

    def __init__(self, at: tuple[int, ...] = (1000, 5000, 10000)):
        self.at = set(at)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.at:
            print(json.dumps({"step": trainer.global_step, "rss_mb": _rss_mb()}), flush=True)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """This process's peak RSS since its exec (VmHWM). getrusage's ru_maxrss is no good in a child:
    Linux carries the parent's resident size at fork over the exec into it."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


# -- the reference: what the paper's code does, written plainly ----------------------------------------
@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op threads set to `threads` inside (None: as they are)."""
    outside = torch.get_num_threads()
    torch.set_num_threads(threads or outside)
    try:
        yield
    finally:
        torch.set_num_threads(outside)


def reference_steps_per_second(warmup: int, steps: int, threads: int | None = None) -> float:
    """The paper's training step, on torch's threads (or `threads`)."""
    with torch_threads(threads):
        return _reference_steps_per_second(warmup, steps)


def _reference_steps_per_second(warmup: int, steps: int) -> float:
    generator = torch.Generator().manual_seed(0)
    w_in = torch.nn.Parameter(torch.empty(N_FEATURES, D_MLP))
    w_out = torch.nn.Parameter(torch.empty(D_MLP, N_FEATURES))
    torch.nn.init.kaiming_uniform_(w_in)
    torch.nn.init.kaiming_uniform_(w_out)
    optimizer = torch.optim.AdamW([w_in, w_out], lr=3e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=warmup + steps)
    losses = []

    def step() -> None:
        mask = torch.rand(BATCH, N_FEATURES, generator=generator) < P
        x = (torch.rand(BATCH, N_FEATURES, generator=generator) * 2 - 1) * mask
        y = torch.relu(x)
        optimizer.zero_grad()
        loss = ((torch.relu(x @ w_in) @ w_out - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def reference_evaluate(model: MLP, p: float, n_nonempty: int = 1_000_000, batch_size: int = 100_000) -> float:
    """The paper's evaluation: dense batches until about n_nonempty non-empty samples; returns L / p."""
    generator = torch.Generator().manual_seed(1)
    w_in, w_out = model.w_in[0].detach().T, model.w_out[0].detach().T  # (n, h), (h, n)
    n_samples = int(n_nonempty / (1 - (1 - p) ** N_FEATURES))
    losses = []
    with torch.no_grad():
        for _ in range(math.ceil(n_samples / batch_size)):
            mask = torch.rand(batch_size, N_FEATURES, generator=generator) < p
            x = (torch.rand(batch_size, N_FEATURES, generator=generator) * 2 - 1) * mask
            losses.append(((torch.relu(x @ w_in) @ w_out - torch.relu(x)) ** 2).mean().item())
    return sum(losses) / len(losses) / p


# -- cis_lightning --------------------------------------------------------------------------------------
def clean_task() -> Task:
    """mlp_clean.yaml's task at the bench's settings: one instance at p = P, labels ReLU(x)."""
    return Task([Instance(feature_probability=P, mixing=Mixing("none"))], N_FEATURES)


def core_steps_per_second(warmup: int, steps: int, batch_size: int = BATCH, loss: Callable | None = None) -> float:
    """The pure-torch core's training step without Lightning: cis's draw, loss, backward, AdamW
    (`cis_lightning.optim`) and cosine schedule, as `cis fit` runs them on mlp_clean.yaml. What
    Lightning's loop adds is the difference (measured at batch 8 too, where the arithmetic is negligible).

    `loss(model, task, t)`: the training loss (K,) of step t, called for t = 0, 1, ... in order,
    backward through autograd (default: `mean_loss_eager` of cis's draw of step t, as `cis fit`)."""
    task, model = clean_task(), MLP(N_FEATURES, D_MLP)
    one = torch.ones(1)  # the gradient of the loss at the one instance's loss
    optimizer = AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=warmup + steps)
    # The threads `cis fit` trains this step on (CCModule's threads=None), unless --threads says.
    threads = None
    if "CIS_BENCH_THREADS" not in os.environ:
        threads = automatic_threads(model, task, batch_size, torch.device("cpu"))

    def step(t: int) -> None:
        optimizer.zero_grad()
        if loss is None:  # as `cis fit` trains: the gradients without autograd (`CCModule.backward`)
            backward = mean_loss_eager(model, task, task.draw(batch_size, t))[1]
            backward(one)
        else:
            loss(model, task, t).sum().backward()
        optimizer.step()
        schedule.step()

    with torch_threads(threads):
        for t in range(warmup):
            step(t)
        start = time.perf_counter()
        for t in range(warmup, warmup + steps):
            step(t)
        return steps / (time.perf_counter() - start)


def cis_steps_per_second(config: str, warmup: int, steps: int, extra: list[str] | None = None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cli = run(
            [
                "fit",
                "--config",
                str(REPO / config),
                "--trainer.max_steps",
                str(warmup + steps),
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.enable_model_summary",
                "false",
                "--trainer.logger.init_args.save_dir",
                tmp,
                "--data.batch_size",
                str(BATCH),
                "--data.feature_probability",
                str(P),
                "--trainer.callbacks+=__main__.StepTimer",
                "--trainer.callbacks.first",
                str(warmup),
                *(["--model.threads", os.environ["CIS_BENCH_THREADS"]] if "CIS_BENCH_THREADS" in os.environ else []),
                *(extra or []),
            ]
        )
        timer = next(c for c in cli.trainer.callbacks if isinstance(c, StepTimer))
        return timer.steps_per_second()


class _BareModule(pl.LightningModule):
    """The least a LightningModule can train: one 10-number parameter, AdamW and a cosine schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.p = torch.nn.Parameter(torch.ones(10))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return (self.p * self.p).sum()

    def configure_optimizers(self):
        optimizer = AdamW([self.p], lr=1e-3)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10_000)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class _Counter(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(10**9))


def bare_lightning_ms(warmup: int, steps: int, profiler: pl.profilers.Profiler | None = None) -> tuple[float, float]:
    """(ms per step of Lightning's loop around `_BareModule`, ms per step of the same step in plain torch):
    the floor that Lightning's automatic optimization puts under every step, whatever the model
    (with Lightning's default profiler, or `profiler`)."""
    timer = StepTimer(warmup)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_steps=warmup + steps,
            profiler=profiler,
            logger=pl.loggers.TensorBoardLogger(tmp),
            callbacks=[timer],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=50,
        )
        trainer.fit(_BareModule(), torch.utils.data.DataLoader(_Counter(), batch_size=None))
    module = _BareModule()
    optimizer = module.configure_optimizers()["optimizer"]
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        module.training_step(None, 0).backward()
        optimizer.step()
    plain = (time.perf_counter() - start) / steps
    return 1e3 / timer.steps_per_second(), 1e3 * plain


def mixed_p_evaluation_seconds(n_nonempty: int, every_instance: bool) -> float:
    """A stratified evaluation of ten instances at p from 0.001 to 1 (sparsity_regimes' grid), as
    `evaluate` runs it: each stratum drawn for the instances it matters to, or (every_instance) for all."""
    ps = [0.001, 0.00215, 0.00464, 0.01, 0.0215, 0.0464, 0.1, 0.215, 0.464, 1.0]
    task = Task([Instance(feature_probability=p, seed=k) for k, p in enumerate(ps)], N_FEATURES)
    model = MLP(N_FEATURES, D_MLP, seeds=list(range(len(ps))))
    start = time.perf_counter()
    plan = plan_strata(task, ps, n_nonempty, 65536, exact_strata(model))
    if every_instance:
        plan = dataclasses.replace(plan, instances=dict.fromkeys(plan.instances))
    evaluate_plan(model, task, plan)
    return time.perf_counter() - start


def seeds_grid(k: int) -> list[str]:
    return ["--data.grid", json.dumps({"seed": list(range(k))})]


def memory_run(steps: int) -> tuple[float, list[dict]]:
    """Peak RSS (MB) of a default `cis fit` of `steps` steps in a child process, and its RSS probes.

    The child reports its own peak (`_peak_rss_mb`)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(steps), tmp],
            capture_output=True,
            text=True,
            check=True,
        )
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    probes = [line for line in lines if "step" in line]
    return next(line["peak_mb"] for line in lines if "peak_mb" in line), probes


def residual_triples(warmup: int, steps: int, triples: int) -> tuple[list[float], list[float], list[float]]:
    """steps/s of `cis fit` of the residual model, of the MLP on its labels (ReLU(x) + (I - W_E W_E^T) x,
    the same function without the embedding: mlp_embedding.yaml) and of the MLP on clean labels, in
    `triples` runs of the three with the residual model in the middle, the MLPs' order alternating
    (so that a steady drift of the machine's speed favours neither side of a ratio)."""
    configs = {"residual": "compressed_computation", "same labels": "mlp_embedding", "clean": "mlp_clean"}
    rates: dict[str, list[float]] = {name: [] for name in configs}
    for i in range(triples):
        order = ("same labels", "residual", "clean") if i % 2 else ("clean", "residual", "same labels")
        for name in order:
            rates[name].append(cis_steps_per_second(f"configs/{configs[name]}.yaml", warmup, steps))
    return rates["residual"], rates["same labels"], rates["clean"]


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median of the repeats' ratios (adjacent measurements: less of the machine's drift)."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


@contextlib.contextmanager
def merging_single_feature_samples(on: bool):
    """Batch means merge their single-feature samples always (on) or never (off), whatever K B is."""
    default = fused.MERGE_SINGLE_FROM
    fused.MERGE_SINGLE_FROM = 0 if on else sys.maxsize
    try:
        yield
    finally:
        fused.MERGE_SINGLE_FROM = default


def k16_untuned(warmup: int, steps: int) -> float:
    """K = 16 steps/s in a child process with glibc's default allocator thresholds (no keep_freed_memory)."""
    env = dict(os.environ, CIS_KEEP_FREED_MEMORY="0")
    out = subprocess.run(
        [sys.executable, __file__, "--k16-child", str(warmup), str(steps)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["steps_per_second"]


def memory_child(steps: int, save_dir: str) -> None:
    torch.set_num_threads(int(os.environ.get("CIS_BENCH_THREADS", torch.get_num_threads())))
    run(
        [
            "fit",
            "--config",
            str(REPO / "configs/compressed_computation.yaml"),
            "--trainer.max_steps",
            str(steps),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.save_dir",
            save_dir,
            "--trainer.callbacks+=__main__.RssProbe",
            "--trainer.callbacks.at",
            json.dumps(sorted({3 * steps // 10, 6 * steps // 10, 9 * steps // 10})),  # after the first validation
        ]
    )
    print(json.dumps({"peak_mb": _peak_rss_mb()}), flush=True)


# -- the table -----------------------------------------------------------------------------------------
def machine() -> str:
    model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{model}, nproc {os.cpu_count()}, torch {torch.__version__} threads {torch.get_num_threads()}, "
        f"Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads for everything (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--steps", type=int, default=400, help="timed steps per training measurement")
    parser.add_argument("--memory-steps", type=int, default=10_000)
    parser.add_argument(
        "--quick", action="store_true", help="fewer steps and repeats (a smoke run, not for the README)"
    )
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--k16-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # the table, not the trainers' chatter
    warnings.filterwarnings("ignore", module="lightning")
    sys.argv[1:] = []  # LightningCLI warns when it is given args and sys.argv has some too
    # The allocator setting of the `cis` command, for every measurement (the reference included).
    tuned = keep_freed_memory()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["CIS_BENCH_THREADS"] = str(args.threads)
    if args.memory_child:
        memory_child(int(args.memory_child[0]), args.memory_child[1])
        return
    if args.k16_child:
        rate = cis_steps_per_second("configs/mlp_clean.yaml", *args.k16_child, seeds_grid(16))
        print(json.dumps({"steps_per_second": rate}))
        return
    if args.quick:
        args.repeats, args.steps, args.memory_steps = 1, 100, 1000
    w, s, r = args.warmup, args.steps, args.repeats
    started = time.perf_counter()
    print(f"machine: {machine()}")
    print(f"allocator: glibc mmap/trim thresholds raised for all measurements: {tuned} (cis_lightning.allocator)")
    print("load average before: " + ", ".join(f"{load:.1f}" for load in os.getloadavg()))
    print(
        f"settings: n={N_FEATURES}, d_mlp={D_MLP}, batch {BATCH}, p={P}; warm-up {w} steps, {s} timed, median of {r}\n"
    )

    # Training: the measurements alternate, so that a slow phase of the machine hits all of them.
    k16_steps = max(s // 4, 50)
    ref, mlp, compiled, k16, core, core8, mlp8, bare = [], [], [], [], [], [], [], []
    ref_one_thread = []
    bare_quiet = []
    k16_unmerged, core_merged, k16_compiled_draw = [], [], []
    mlp_numpy, core_numpy, k16_numpy = [], [], []
    compile_draw, k16_grid = ["--data.compile", "true"], seeds_grid(16)
    bar, bar_every_step = [], []
    for _ in range(r):
        # Adjacent runs for the ratios to the reference: reference, MLP, core step.
        ref.append(reference_steps_per_second(w, s))
        mlp.append(cis_steps_per_second("configs/mlp_clean.yaml", w, s))
        core.append(core_steps_per_second(w, s))
        # cis trains the MLP on one thread (CCModule's threads): the reference on one, for comparison.
        ref_one_thread.append(reference_steps_per_second(w, s, threads=1))
        # The C kernels off: numpy and torch, whose merge of single-feature samples MERGE_SINGLE_FROM
        # decides (the C bookkeeping always merges). Right after the same runs with the C kernels.
        with native.turned_off():
            mlp_numpy.append(cis_steps_per_second("configs/mlp_clean.yaml", w, s))
            core_numpy.append(core_steps_per_second(w, s))
            with merging_single_feature_samples(True):  # right after the same step unmerged
                core_merged.append(core_steps_per_second(w, s))
        core8.append(core_steps_per_second(w, 4 * s, batch_size=8))
        mlp8.append(cis_steps_per_second("configs/mlp_clean.yaml", w, 4 * s, ["--data.batch_size", "8"]))
        # torch.compile of the loss: compiled during the warm-up, so not timed.
        compiled.append(cis_steps_per_second("configs/mlp_clean.yaml", w, s, ["--model.compile", "true"]))
        k16.append(cis_steps_per_second("configs/mlp_clean.yaml", w, k16_steps, k16_grid))
        with native.turned_off():
            k16_numpy.append(cis_steps_per_second("configs/mlp_clean.yaml", w, k16_steps, k16_grid))
            with merging_single_feature_samples(False):
                k16_unmerged.append(cis_steps_per_second("configs/mlp_clean.yaml", w, k16_steps, k16_grid))
        # The draw compiled during the warm-up (a few seconds), so not timed.
        k16_compiled_draw.append(cis_steps_per_second("configs/mlp_clean.yaml", w, k16_steps, k16_grid + compile_draw))
        bare.append(bare_lightning_ms(w, 4 * s))
        bare_quiet.append(bare_lightning_ms(w, 4 * s, NoProfiler()))
        # Lightning's bars draw on stdout: into /dev/null here, a real file (a StringIO cost nothing).
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            bar_on = ["--trainer.enable_progress_bar", "true"]
            bar.append(cis_steps_per_second("configs/mlp_clean.yaml", w, s, bar_on))
            every_step = [*bar_on, "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"]
            every_step += ["--trainer.callbacks.refresh_rate", "1"]
            bar_every_step.append(cis_steps_per_second("configs/mlp_clean.yaml", w, s, every_step))
    residual, same_labels, clean = residual_triples(w, s, 3 * r)
    # Adjacent measurements: the ratio of each repeat, then its median (less of the machine's drift).
    native_gain_fit, native_gain_core = median_ratio(mlp, mlp_numpy), median_ratio(core, core_numpy)
    fit_gain, core_gain = median_ratio(mlp, ref), median_ratio(core, ref)
    residual_cost, embedding_cost = median_ratio(clean, residual), median_ratio(same_labels, residual)
    merged_gain_k1 = median_ratio(core_merged, core_numpy)
    merged_gain_k16, native_gain_k16 = median_ratio(k16_numpy, k16_unmerged), median_ratio(k16, k16_numpy)
    compiled_draw_gain_k16 = median_ratio(k16_compiled_draw, k16)
    ref, mlp, compiled, core, core8, mlp8, core_merged, mlp_numpy, core_numpy = (
        statistics.median(v) for v in (ref, mlp, compiled, core, core8, mlp8, core_merged, mlp_numpy, core_numpy)
    )
    residual, same_labels, clean = (statistics.median(v) for v in (residual, same_labels, clean))
    ref_one_thread = statistics.median(ref_one_thread)
    k16, k16_numpy, k16_unmerged, k16_compiled_draw = (
        statistics.median(v) for v in (k16, k16_numpy, k16_unmerged, k16_compiled_draw)
    )
    bare_loop, bare_plain = (statistics.median(v) for v in zip(*bare, strict=True))
    quiet_loop, quiet_plain = (statistics.median(v) for v in zip(*bare_quiet, strict=True))
    bar, bar_every_step = statistics.median(bar), statistics.median(bar_every_step)
    k1 = mlp
    k16_default_allocator = k16_untuned(w, k16_steps)
    k82 = cis_steps_per_second("configs/mlp_clean.yaml", 10, 40, seeds_grid(82))
    k82_compiled_draw = cis_steps_per_second("configs/mlp_clean.yaml", 10, 40, seeds_grid(82) + compile_draw)
    # sparsity_regimes' ten p: p > 0.2 makes every instance's batch dense (one uniform per entry).
    regimes = yaml.safe_load((REPO / "configs/experiments/sparsity_regimes.yaml").read_text())["data"]["grid"]
    dense_grid = ["--data.grid", json.dumps({"feature_probability": regimes["feature_probability"]})]
    dense10 = cis_steps_per_second("configs/mlp_clean.yaml", 10, 100, dense_grid)
    dense10_compiled_draw = cis_steps_per_second("configs/mlp_clean.yaml", 10, 100, dense_grid + compile_draw)

    # Evaluation at p = 0.001 of one (untrained, Kaiming-initialised) MLP.
    p_eval = 0.001
    task = Task([Instance(feature_probability=p_eval)], N_FEATURES)
    model = MLP(N_FEATURES, D_MLP)
    start = time.perf_counter()
    brute = reference_evaluate(model, p_eval)
    brute_seconds = time.perf_counter() - start
    fast_times, fast = [], None
    for _ in range(r):
        start = time.perf_counter()
        fast = evaluate(model, task, n_nonempty=4000)
        fast_times.append(time.perf_counter() - start)
    fast_seconds = statistics.median(fast_times)
    lpf, err = float(fast.loss_per_feature[0]), float(fast.stderr[0])
    mixed = mixed_p_evaluation_seconds(20_000, every_instance=False)
    mixed_all = mixed_p_evaluation_seconds(20_000, every_instance=True)

    peak_mb, probes = memory_run(args.memory_steps)

    rows = [
        ("reference loop (paper's code), steps/s", f"{ref:.1f}", ""),
        ("  the same on one thread (as cis trains this MLP), steps/s", f"{ref_one_thread:.1f}", ""),
        ("cis fit MLP, steps/s", f"{mlp:.1f}", ""),
        ("  ratio cis / reference, of the medians", f"{mlp / ref:.2f}x", ""),
        ("  ratio cis / reference, median of the repeats' ratios", f"{fit_gain:.2f}x", ">= 3x"),
        ("  the same step in the core (torch and C, no Lightning), steps/s", f"{core:.1f}", ""),
        ("  ratio core step / reference, of the medians", f"{core / ref:.2f}x", ""),
        ("  ratio core step / reference, median of the repeats' ratios", f"{core_gain:.2f}x", ""),
        ("  cis fit with the C kernels off (CIS_NATIVE=0: numpy and torch), steps/s", f"{mlp_numpy:.1f}", ""),
        ("    with / without, median of the repeats' ratios", f"{native_gain_fit:.2f}x", ""),
        ("  the core step with the C kernels off, steps/s", f"{core_numpy:.1f}", ""),
        ("    with / without, median of the repeats' ratios", f"{native_gain_core:.2f}x", ""),
        (
            "    and single-feature samples merged (numpy does not at K=1; C always does), steps/s",
            f"{core_merged:.1f}",
            "",
        ),
        ("    merged / unmerged, median of the repeats' ratios", f"{merged_gain_k1:.2f}x", ""),
        ("  Lightning's loop per step (cis fit - core, at batch 8), ms", f"{1e3 / mlp8 - 1e3 / core8:.2f}", ""),
        ("  Lightning's own loop per step (1-parameter module - plain loop), ms", f"{bare_loop - bare_plain:.2f}", ""),
        (
            "    with cis's NoProfiler instead of Lightning's default profiler, ms",
            f"{quiet_loop - quiet_plain:.2f}",
            "",
        ),
        (f"  with cis's progress bar (redrawn every {PROGRESS_BAR_REFRESH} steps), steps/s", f"{bar:.1f}", ""),
        ("  with a progress bar redrawn every step (Lightning's default), steps/s", f"{bar_every_step:.1f}", ""),
        ("cis fit MLP --model.compile true, steps/s", f"{compiled:.1f}", ""),
        ("  ratio compiled cis / reference", f"{compiled / ref:.2f}x", ""),
        ("cis fit residual MLP (d_embed 1000), steps/s", f"{residual:.1f}", ""),
        ("  the MLP on its labels, ReLU(x) + (I - W_E W_E^T) x (mlp_embedding), steps/s", f"{same_labels:.1f}", ""),
        ("  residual step time / that MLP's step time, of the medians", f"{same_labels / residual:.2f}x", ""),
        (
            "  residual step time / that MLP's step time, median of the repeats' ratios",
            f"{embedding_cost:.2f}x",
            "<= 1.5x",
        ),
        ("  the MLP on clean labels ReLU(x) (mlp_clean, in the same runs), steps/s", f"{clean:.1f}", ""),
        ("  residual step time / clean MLP step time, of the medians", f"{clean / residual:.2f}x", ""),
        ("  residual step time / clean MLP step time, median of the repeats' ratios", f"{residual_cost:.2f}x", ""),
        ("cis fit K=16 instance-steps/s", f"{16 * k16:.1f}", ""),
        ("  K=16 / K=1 instance-steps/s", f"{16 * k16 / k1:.2f}x", ">= 2x"),
        ("  K=16 with the C kernels off (numpy bookkeeping), instance-steps/s", f"{16 * k16_numpy:.1f}", ""),
        ("    with / without, median of the repeats' ratios", f"{native_gain_k16:.2f}x", ""),
        ("    and without merging single-feature samples, instance-steps/s", f"{16 * k16_unmerged:.1f}", ""),
        ("      merged / unmerged, median of the repeats' ratios", f"{merged_gain_k16:.2f}x", ""),
        (
            "  K=16 with glibc's default malloc thresholds (child), instance-steps/s",
            f"{16 * k16_default_allocator:.1f}",
            "",
        ),
        ("  K=16 --data.compile true (the draw compiled), instance-steps/s", f"{16 * k16_compiled_draw:.1f}", ""),
        ("    compiled draw / eager draw, median of the repeats' ratios", f"{compiled_draw_gain_k16:.2f}x", ""),
        ("cis fit K=82 in one process, steps/s", f"{k82:.2f}", "runs"),
        ("  K=82 --data.compile true, steps/s", f"{k82_compiled_draw:.2f}", ""),
        ("cis fit K=10 on dense batches (p = 0.001 .. 1, sparsity_regimes), steps/s", f"{dense10:.2f}", ""),
        ("  --data.compile true, steps/s", f"{dense10_compiled_draw:.2f}", ""),
        ("eval p=0.001 brute force (1e6 non-empty, dense), s", f"{brute_seconds:.2f}", ""),
        ("eval p=0.001 stratified + exact, s", f"{fast_seconds:.3f}", ""),
        ("  speed-up", f"{brute_seconds / fast_seconds:.0f}x", ">= 20x"),
        ("  L/p stratified +- stderr (relative)", f"{lpf:.5f} +- {err:.5f} ({100 * err / lpf:.3f}%)", "< 0.5%"),
        ("  L/p brute force", f"{brute:.5f}", ""),
        ("eval of ten p (0.001 .. 1), 2e4 non-empty each, strata per instance, s", f"{mixed:.2f}", ""),
        ("  every stratum for every instance, s", f"{mixed_all:.2f}", ""),
        ("  speed-up", f"{mixed_all / mixed:.1f}x", ""),
        (f"peak RSS of a {args.memory_steps}-step default run, MB", f"{peak_mb:.0f}", ""),
        (
            "  RSS at steps " + ", ".join(str(p["step"]) for p in probes),
            ", ".join(f"{p['rss_mb']:.0f}" for p in probes),
            "flat",
        ),
    ]
    width = max(len(name) for name, _, _ in rows)
    print(f"{'measure':<{width}}  {'value':>28}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>28}  {target}")
    print("load average after: " + ", ".join(f"{load:.1f}" for load in os.getloadavg()))
    print(f"bench time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
