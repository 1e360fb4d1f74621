"""The analysis callbacks in a real `cis fit`: event files read back with TensorBoard's own reader and
through a real TensorBoard server; the presets compose with every config."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from cis_lightning.analysis import alignment_summary
from cis_lightning.lightning.callbacks import EigenAlignment, Figures, PerFeatureLoss
from cis_lightning.lightning.cli import CISCLI, TRAINER_DEFAULTS, run
from cis_lightning.lightning.datamodule import CCDataModule
from cis_lightning.lightning.module import CCModule
from tests.conftest import REPO, tiny_args

CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
PRESETS = {
    "alignment.yaml": [EigenAlignment],
    "per_feature_loss.yaml": [PerFeatureLoss],
    "figures.yaml": [Figures],
    "analysis.yaml": [EigenAlignment, PerFeatureLoss, Figures],
}
N_FEATURES = 100
STEPS = 60
FIGURES = ["alignment", "response", "weight_bars", "interference", "entry_fit", "loss_against_p"]


def fit_args(save_dir: Path, config: str, preset: str, steps: int = STEPS) -> list[str]:
    args = tiny_args(save_dir, f"configs/{config}", steps, log_every_n_steps=None)
    return ["fit", *args, "--config", str(REPO / "callbacks" / preset)]


DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


@pytest.fixture(scope="module")
def analysed_run(tmp_path_factory) -> Path:
    """A real 60-step `cis fit` of mlp_gaussian with callbacks/analysis.yaml in two DDP processes (gloo on
    the CPU), so that every test of the outputs is also a test of the collectives: on every rank (the
    per-feature metric, evaluate, trainer.log_dir), drawing on rank zero; a mismatch deadlocks or kills
    the run. Returns the run directory."""
    save_dir = tmp_path_factory.mktemp("runs")
    args = fit_args(save_dir, "mlp_gaussian.yaml", "analysis.yaml")
    # A command-line value for a list of callbacks sets the last one's argument (here: Figures').
    args += ["--trainer.callbacks.init_args.n_nonempty", "1000", "--trainer.callbacks.init_args.n_grid", "2", *DDP]
    done = subprocess.run(
        [sys.executable, "-m", "cis_lightning", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "distributed_backend=gloo" in done.stdout + done.stderr
    (run_dir,) = (save_dir / "mlp_gaussian").iterdir()
    return run_dir


@pytest.fixture(scope="module")
def events(analysed_run) -> EventAccumulator:
    accumulator = EventAccumulator(str(analysed_run), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def feature_tags() -> list[str]:
    return [f"per_feature/feature_{j:02d}" for j in range(N_FEATURES)]


def alignment_tags() -> list[str]:
    names = alignment_summary(torch.randn(1, 2, 4), torch.randn(1, 4, 2), torch.zeros(1, 4, 4))
    return [f"alignment/{name}" for name in names] + ["alignment/effective_rank_M"]


def test_fit_with_the_analysis_preset_logs_finite_alignment_and_per_feature_scalars(events):
    tags = set(events.Tags()["scalars"])
    expected = alignment_tags() + feature_tags()
    expected += [f"per_feature/{name}" for name in ("worst", "worst_index", "best", "best_index", "mean")]
    assert set(expected) <= tags
    for tag in expected:
        values = [e.value for e in events.Scalars(tag)]
        assert values and all(math.isfinite(v) for v in values), tag
    # Alignment at the start and at the end of training; per-feature losses at the end (the default
    # intervals are longer than this run).
    assert [e.step for e in events.Scalars("alignment/cos_eig_top")] == [0, STEPS]
    assert [e.step for e in events.Scalars("per_feature/feature_00")] == [STEPS]
    worst = events.Scalars("per_feature/worst")[-1].value
    assert worst == max(events.Scalars(t)[-1].value for t in feature_tags())


def test_the_custom_scalar_layout_charts_every_feature_in_one_multiline_chart(events):
    assert "custom_scalars__config__" in events.Tags()["tensors"]
    proto = events.Tensors("custom_scalars__config__")[-1].tensor_proto
    layout = layout_pb2.Layout()
    layout.ParseFromString(proto.string_val[0])
    charts = {chart.title: chart for category in layout.category for chart in category.chart}
    assert {c.title for c in layout.category} == {"eigen-subspace alignment", "per-feature loss"}
    (pattern,) = charts["L_j / p of every feature j"].multiline.tag
    scalar_tags = events.Tags()["scalars"]
    assert sorted(t for t in scalar_tags if re.search(pattern, t)) == feature_tags()
    (pattern,) = charts["cos(E_i, W_out W_in E_i): top d_mlp vs rest"].multiline.tag
    assert sorted(t for t in scalar_tags if re.search(pattern, t)) == [
        "alignment/cos_eig_rest",
        "alignment/cos_eig_top",
    ]


def test_images_of_the_alignment_the_feature_heatmap_and_the_papers_figures_are_logged(events, analysed_run):
    images = set(events.Tags()["images"])
    assert {"alignment/figure", "per_feature/heatmap"} | {f"figures/{name}" for name in FIGURES} <= images
    for tag in images:
        event = events.Images(tag)[-1]
        pixels = imread(io.BytesIO(event.encoded_image_string), format="png")
        assert pixels.shape[:2] == (event.height, event.width) and event.width > 100
        assert torch.isfinite(torch.from_numpy(pixels.copy())).all()
    for name in FIGURES:
        assert (analysed_run / "figures" / f"{name}.png").stat().st_size > 1000


def test_default_callbacks_survive_the_preset(analysed_run):
    # ModelCheckpoint comes from the CLI's trainer defaults, not from the preset.
    assert (analysed_run / "checkpoints" / "last.ckpt").is_file()
    assert (analysed_run / "weights.pt").is_file()


def test_rank_zero_alone_writes_events(analysed_run):
    assert len(list(analysed_run.glob("events.out.tfevents.*"))) == 1


def test_testing_the_checkpoint_draws_the_figures_again_in_the_test_run(analysed_run):
    # `cis test` reads the run's config.yaml, which carries the callbacks; Figures draws at test end.
    # In this one process: the run's own settings were two DDP processes.
    one_process = ["--trainer.strategy", "auto", "--trainer.devices", "1"]
    test = run(["test", "--ckpt_path", str(analysed_run / "checkpoints" / "last.ckpt"), *one_process])
    test_dir = Path(test.trainer.log_dir)
    assert test_dir != analysed_run
    assert all((test_dir / "figures" / f"{name}.png").is_file() for name in FIGURES)
    events = EventAccumulator(str(test_dir), size_guidance={"images": 0})
    events.Reload()
    assert {f"figures/{name}" for name in FIGURES} <= set(events.Tags()["images"])


def test_two_instances_get_their_own_tags_and_charts(tmp_path):
    args = fit_args(tmp_path, "mlp_gaussian.yaml", "alignment.yaml", steps=20)
    args[5:5] = ["--config", str(REPO / "callbacks" / "per_feature_loss.yaml")]  # two presets compose
    # 20 steps: one per-feature accumulation (every 20), logged with the figures at the end of training.
    cli = run([*args, "--data.grid", "{seed: [0, 1]}", "--model.network.init_args.d_mlp", "10"])
    events = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for k in (0, 1):
        assert {f"alignment/cos_eig_top/instance_{k}", f"per_feature/worst/instance_{k}"} <= tags
        assert {f"{tag}/instance_{k}" for tag in feature_tags()} <= tags
        assert {f"alignment/figure/instance_{k}", f"per_feature/heatmap/instance_{k}"} <= set(events.Tags()["images"])
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    charts = {chart.title: chart for category in layout.category for chart in category.chart}
    (pattern,) = charts["L_j / p of every feature j (instance 1)"].multiline.tag
    assert sorted(t for t in tags if re.search(pattern, t)) == [f"{tag}/instance_1" for tag in feature_tags()]


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("config", CONFIGS)
def test_every_preset_composes_with_every_config(config, preset, tmp_path):
    cli = CISCLI(
        CCModule,
        CCDataModule,
        args=["--config", str(REPO / "configs" / config), "--config", str(REPO / "callbacks" / preset)]
        + ["--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"],
        run=False,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=False,
    )
    types = [type(c) for c in cli.trainer.callbacks]
    assert [t for t in types if t in (EigenAlignment, PerFeatureLoss, Figures)] == PRESETS[preset]
    (checkpoint,) = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert checkpoint.save_last and checkpoint._every_n_train_steps == 1000


def test_alignment_preset_trains_the_residual_model(tmp_path):
    # The residual model's alignment is measured against its own mixing I - W_E W_E^T.
    args = fit_args(tmp_path, "compressed_computation.yaml", "alignment.yaml", steps=10)
    cli = run([*args, "--model.network.init_args.d_embed", "64"])
    events = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    rank = events.Scalars("alignment/effective_rank_M")[0].value
    assert 1 <= rank <= N_FEATURES  # the bounds of any nonzero n x n matrix's effective rank
    assert "alignment/figure" in events.Tags()["images"]


def test_a_bad_callback_interval_is_one_clear_error(tmp_path, capsys):
    preset = tmp_path / "bad.yaml"
    preset.write_text(
        "trainer:\n  callbacks+:\n    - class_path: cis_lightning.lightning.callbacks.EigenAlignment\n"
        "      init_args: {every_n_steps: 0}\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(REPO / "configs/mlp_gaussian.yaml"), "--config", str(preset)])
    assert exit_info.value.code == 2
    assert "EigenAlignment.every_n_steps: must be a positive integer, got 0" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def test_a_real_tensorboard_server_serves_the_scalars_and_images(analysed_run, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "tensorboard.log").open("w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(analysed_run.parent)]
        + ["--host", "127.0.0.1", "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        run_name = analysed_run.name
        # The server reads the event file in the background: poll until the last-written image is in.
        deadline = time.monotonic() + 60
        images: dict = {}
        while time.monotonic() < deadline and "figures/entry_fit" not in images.get(run_name, {}):
            assert server.poll() is None, (tmp_path / "tensorboard.log").read_text()
            with contextlib.suppress(OSError):  # not listening yet
                images = get_json(f"{base}/data/plugin/images/tags")
            time.sleep(0.5)
        assert {"alignment/figure", "per_feature/heatmap"} | {f"figures/{n}" for n in FIGURES} <= set(images[run_name])
        tags = get_json(f"{base}/data/plugin/scalars/tags")
        assert set(feature_tags()) | set(alignment_tags()) <= set(tags[run_name])
        query = urllib.parse.urlencode({"run": run_name, "tag": "alignment/cos_eig_top"})
        points = get_json(f"{base}/data/plugin/scalars/scalars?{query}")
        assert [p[1] for p in points] == [0, STEPS] and all(math.isfinite(p[2]) for p in points)
        query = urllib.parse.urlencode({"run": run_name, "tag": "figures/alignment", "sample": 0})
        (entry,) = get_json(f"{base}/data/plugin/images/images?{query}")
        with urllib.request.urlopen(f"{base}/data/plugin/images/individualImage?{entry['query']}", timeout=10) as r:
            png = r.read()
        assert png.startswith(b"\x89PNG") and imread(io.BytesIO(png), format="png").shape[1] > 100
        layout = get_json(f"{base}/data/plugin/custom_scalars/layout")
        assert {c["title"] for c in layout["category"]} == {"eigen-subspace alignment", "per-feature loss"}
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()
