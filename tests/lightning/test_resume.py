"""Nothing is lost: SIGTERM, SIGKILL at any moment, kills during checkpoint writes, and divergence.

A run interrupted by a real signal in a real `cis` process and restarted with the same command plus
`--ckpt_path last` must end with bitwise the same weights (CPU) and the same TensorBoard curve as an
uninterrupted run.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cis_lightning.lightning.checkpointing import AtomicCheckpointIO, read_checkpoint
from cis_lightning.lightning.cli import EXIT_SIGTERM, run
from tests.conftest import REPO, tiny_args

pytestmark = pytest.mark.filterwarnings(
    "ignore:LightningCLI's args parameter", "ignore:Checkpoint directory", "ignore:The dirpath has changed"
)

STEPS = 30  # not a multiple of CHECKPOINT_EVERY: the final state is saved by the end-of-training checkpoint
CHECKPOINT_EVERY = 4
NAME = "resume"


def fit_args(save_dir: Path) -> list[str]:
    """One config for every run here: learned sigma, a log entry every step, validation every 10 steps."""
    return [
        "fit",
        *tiny_args(save_dir, steps=STEPS),
        "--trainer.logger.init_args.name",
        NAME,
        "--data.batch_size",
        "64",
        "--data.learn_sigma",
        "true",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.val_check_interval",
        "10",
        "--checkpoint.every_n_train_steps",
        str(CHECKPOINT_EVERY),
        "--checkpoint.save_top_k",
        "-1",  # keep every periodic checkpoint
        "--ckpt_path",
        "last",  # the same command starts the run and resumes it
    ]


def curve(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run directory as (step, value) lists, as TensorBoard shows them.

    TensorBoard reads all event files of the directory and drops the events that a killed process
    wrote after the step its successor resumed from (the successor's purge_step).
    """
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def weights(cli) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in cli.model.state_dict().items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run: its final weights, its curve and its run directory."""
    save_dir = tmp_path_factory.mktemp("reference")
    cli = run(fit_args(save_dir))
    run_dir = Path(cli.trainer.log_dir)
    return {"weights": weights(cli), "curve": curve(run_dir), "run_dir": run_dir}


@pytest.fixture
def start_cis(tmp_path):
    """start_cis(args) runs `cis ARGS` in a new process (output: tmp_path/cis.log), killed at teardown if alive."""
    processes = []
    with open(tmp_path / "cis.log", "w") as log:

        def start(args: list[str]) -> subprocess.Popen:
            command = [sys.executable, "-m", "cis_lightning", *args]
            processes.append(subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log))
            return processes[-1]

        yield start
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def wait_for_checkpoint(process: subprocess.Popen, path: Path, timeout: float = 600) -> None:
    """Wait until the first periodic checkpoint exists: training is under way and its signal handlers are set."""
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)


def wait_for_the_next_second(run_dir: Path) -> None:
    """TensorBoard orders a directory's event files by name, which starts with the writer's creation
    second: a resume within the second in which the killed run started (possible only because these
    runs are tiny) would sort before it and TensorBoard would drop the earlier steps."""
    newest = max(int(path.name.split(".")[3]) for path in run_dir.glob("events.out.tfevents.*"))
    while time.time() < newest + 1:
        time.sleep(0.05)


def assert_resumes_exactly(save_dir: Path, reference: dict) -> None:
    wait_for_the_next_second(save_dir / NAME / "version_0")
    resumed = run(fit_args(save_dir))
    assert Path(resumed.trainer.log_dir) == save_dir / NAME / "version_0"  # the same run directory
    assert resumed.trainer.global_step == STEPS
    final = weights(resumed)
    assert final.keys() == reference["weights"].keys()
    for name, value in reference["weights"].items():
        assert torch.equal(final[name], value), name
    assert curve(save_dir / NAME / "version_0") == reference["curve"]


def test_an_uninterrupted_run_with_ckpt_path_last_starts_fresh_and_saves_its_final_step(reference):
    assert reference["run_dir"].name == "version_0"
    last = read_checkpoint(reference["run_dir"] / "checkpoints" / "last.ckpt")
    assert last["global_step"] == STEPS
    assert len(reference["curve"]["train/loss"]) == STEPS  # one entry per step
    assert torch.equal(last["state_dict"]["network.w_in"], reference["weights"]["network.w_in"])


@pytest.mark.parametrize("step", [8, 20], ids=["mid_run", "right_after_a_validation"])
def test_resuming_from_a_periodic_checkpoint_gives_the_same_weights_and_curve(reference, step, tmp_path):
    checkpoint = reference["run_dir"] / "checkpoints" / f"epoch=0-step={step}.ckpt"
    resumed = run([*fit_args(tmp_path / "runs"), "--ckpt_path", str(checkpoint)])
    for name, value in weights(resumed).items():
        assert torch.equal(value, reference["weights"][name]), name
    # The resumed run logs exactly the reference's entries from `step` on: none twice, none missing.
    tail = {tag: [(s, v) for s, v in values if s >= step] for tag, values in reference["curve"].items()}
    assert curve(Path(resumed.trainer.log_dir)) == {tag: values for tag, values in tail.items() if values}


def test_sigterm_saves_the_current_step_exits_cleanly_and_resumes_exactly(reference, start_cis, tmp_path):
    save_dir = tmp_path / "runs"
    process = start_cis(fit_args(save_dir))
    last = save_dir / NAME / "version_0" / "checkpoints" / "last.ckpt"
    wait_for_checkpoint(process, last)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == EXIT_SIGTERM
    output = (tmp_path / "cis.log").read_text()
    assert "Traceback" not in output
    assert "stopped by SIGTERM" in output
    # Nothing lost: the checkpoint is the state after the last step that the killed process logged.
    saved = read_checkpoint(last)["global_step"]
    logged = curve(save_dir / NAME / "version_0")["train/loss"]
    assert 0 < saved < STEPS
    assert logged[-1][0] == saved - 1  # train/loss of batch index s is logged at step s
    assert_resumes_exactly(save_dir, reference)


def test_sigkill_at_a_random_moment_then_resume_is_bitwise_exact(reference, start_cis, tmp_path):
    save_dir = tmp_path / "runs"
    process = start_cis(fit_args(save_dir))
    last = save_dir / NAME / "version_0" / "checkpoints" / "last.ckpt"
    wait_for_checkpoint(process, last)
    time.sleep(random.uniform(0, 0.02))  # short: the run must still be training on a fast machine
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert read_checkpoint(last)["global_step"] < STEPS
    assert_resumes_exactly(save_dir, reference)


def test_testing_a_resumed_run_leaves_the_run_untouched(reference, tmp_path):
    # A resumed fit's config.yaml names its own version directory and a TensorBoard purge step;
    # `cis test --ckpt_path RUN/checkpoints/last.ckpt` reads that config and must still log elsewhere.
    save_dir = tmp_path / "runs"
    run([*fit_args(save_dir), "--ckpt_path", str(reference["run_dir"] / "checkpoints" / "epoch=0-step=20.ckpt")])
    run_dir = save_dir / NAME / "version_0"
    resumed = run(fit_args(save_dir))  # from its own last.ckpt, at the final step: nothing left to train
    assert Path(resumed.trainer.log_dir) == run_dir
    config = (run_dir / "config.yaml").read_text()
    tested = run(["test", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")])
    assert Path(tested.trainer.log_dir) != run_dir
    assert (Path(tested.trainer.log_dir) / "results.csv").is_file()
    assert (run_dir / "config.yaml").read_text() == config
    tail = {tag: [(s, v) for s, v in values if s >= 20] for tag, values in reference["curve"].items()}
    assert curve(run_dir) == {tag: values for tag, values in tail.items() if values}


def _write_checkpoints_forever(path: Path, ready: int) -> None:
    """Child process: rewrite `path` with checkpoint 1, 2, 3, ... whose every entry equals its number."""
    torch.set_num_threads(1)
    io = AtomicCheckpointIO()
    for number in range(1, 1_000_000):
        io.save_checkpoint({"state_dict": {"w": torch.full((1_000_000,), float(number))}, "number": number}, path)
        if number == 1:
            os.write(ready, b"1")


def test_sigkill_during_checkpoint_writes_never_leaves_last_unusable(tmp_path):
    # 4 MB checkpoints rewritten back to back, so most kills land in the middle of a write.
    path = tmp_path / "last.ckpt"
    for _ in range(20):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest
            try:
                os.close(read_end)
                _write_checkpoints_forever(path, write_end)
            finally:
                os._exit(0)
        os.close(write_end)
        try:
            ready, _, _ = select.select([read_end], [], [], 120)
            assert ready and os.read(read_end, 1) == b"1", "the writer never finished its first checkpoint"
            time.sleep(random.uniform(0, 0.05))
        finally:  # never leave a writer behind
            os.close(read_end)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        checkpoint = read_checkpoint(path)  # ConfigError if the file were torn
        assert torch.all(checkpoint["state_dict"]["w"] == checkpoint["number"])


def test_a_diverging_run_names_step_and_instance_and_keeps_its_last_good_checkpoint(tmp_path, capsys):
    # lr = 1e30: the first step moves every weight by about 1e30, so the loss of step 1 overflows.
    save_dir = tmp_path / "runs"
    args = ["fit", *tiny_args(save_dir, steps=10), "--model.lr", "1e30", "--checkpoint.every_n_train_steps", "1"]
    args += ["--trainer.log_every_n_steps", "50"]  # found at the checkpoint, not at a logging step
    with pytest.raises(SystemExit) as stopped:
        run(args)
    assert stopped.value.code == 1
    message = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cis: error:")]
    assert len(message) == 1
    assert "training diverged" in message[0] and "instance 0" in message[0] and "at step 1 " in message[0]
    last = read_checkpoint(next(save_dir.rglob("last.ckpt")))
    assert last["global_step"] == 1  # the state after step 0, saved before the loss of step 1 was seen
    assert all(torch.isfinite(value).all() for value in last["state_dict"].values() if value.is_floating_point())


def test_divergence_names_the_instance_that_diverged(tmp_path, capsys):
    # sigma = 1e25 makes instance 1's labels (and loss) overflow float32 at the first step.
    args = ["fit", *tiny_args(tmp_path / "runs", steps=5), "--data.grid", '{"sigma": [0.03, 1e25]}']
    with pytest.raises(SystemExit) as stopped:
        run(args)
    assert stopped.value.code == 1
    message = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cis: error:")]
    assert len(message) == 1
    assert "instance 1 (sigma=1e+25" in message[0] and "at step 0 " in message[0] and "instance 0" not in message[0]
