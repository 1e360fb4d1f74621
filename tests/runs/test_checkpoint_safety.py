"""Checkpoints are data, not code: no loading path of the package ever runs code from a checkpoint.

The hostile checkpoint is a real checkpoint of a real run plus one pickled object whose unpickling
calls exec() to create a marker file. A control test shows that an unsafe load (weights_only=False)
does create the marker; every path of the package must refuse the file and leave no marker.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cis_lightning.core.errors import ConfigError
from cis_lightning.lightning.checkpointing import AtomicCheckpointIO, read_checkpoint
from cis_lightning.lightning.cli import run
from cis_lightning.runs import load_run
from tests.conftest import tiny_args

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


class RunsCodeWhenUnpickled:
    """Unpickling this calls exec(source): here, creating the marker file."""

    def __init__(self, marker: Path):
        self.source = f"open({str(marker)!r}, 'w').close()"

    def __reduce__(self):
        return exec, (self.source,)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict:
    """A trained run whose last.ckpt (and checkpoints/hostile.ckpt) also carry a code-running object."""
    root = tmp_path_factory.mktemp("hostile")
    save_dir = root / "runs"
    fit = run(["fit", *tiny_args(save_dir, steps=2)])
    run_dir = Path(fit.trainer.log_dir)
    marker = root / "code_ran.marker"
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["payload"] = RunsCodeWhenUnpickled(marker)
    for name in ("hostile.ckpt", "last.ckpt"):
        torch.save(checkpoint, run_dir / "checkpoints" / name)
    path = run_dir / "checkpoints" / "hostile.ckpt"
    return {"save_dir": save_dir, "run_dir": run_dir, "path": path, "marker": marker}


def assert_refused_by_the_cli(args: list[str], hostile: dict, capsys, field: str = "ckpt_path") -> str:
    with pytest.raises(SystemExit) as stopped:
        run(args)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    messages = [line for line in err.splitlines() if line.startswith("cis: error:")]
    assert len(messages) == 1, err
    assert field in messages[0]
    assert "Traceback" not in err
    assert not hostile["marker"].exists()
    return messages[0]


def test_control_an_unsafe_load_of_the_hostile_checkpoint_runs_its_code(hostile):
    torch.load(hostile["path"], weights_only=False)
    assert hostile["marker"].exists()
    hostile["marker"].unlink()


def test_resume_refuses_it(hostile, capsys):
    args = ["fit", *tiny_args(hostile["save_dir"], steps=4), "--ckpt_path", str(hostile["path"])]
    message = assert_refused_by_the_cli(args, hostile, capsys)
    assert "call exec" in message and "refused" in message


def test_resume_from_last_refuses_it(hostile, capsys):
    args = ["fit", *tiny_args(hostile["save_dir"], steps=4), "--ckpt_path", "last"]
    assert "refused" in assert_refused_by_the_cli(args, hostile, capsys)


@pytest.mark.parametrize("subcommand", ["test", "validate"])
def test_evaluating_it_refuses_it(hostile, subcommand, capsys):
    # Only the checkpoint, as in `cis test --ckpt_path RUN/checkpoints/x.ckpt`: the run's config.yaml is used.
    assert "refused" in assert_refused_by_the_cli([subcommand, "--ckpt_path", str(hostile["path"])], hostile, capsys)


def test_initialising_from_it_refuses_it(hostile, capsys):
    args = ["fit", *tiny_args(hostile["save_dir"], steps=4), "--model.init_from", str(hostile["path"])]
    assert_refused_by_the_cli(args, hostile, capsys, field="model.init_from")


def test_the_checkpoint_io_refuses_it(hostile):
    with pytest.raises(ConfigError, match="call exec"):
        AtomicCheckpointIO().load_checkpoint(hostile["path"])
    with pytest.raises(ConfigError, match="weights_only"):
        AtomicCheckpointIO().load_checkpoint(hostile["path"], weights_only=False)
    with pytest.raises(ConfigError, match="refused"):
        read_checkpoint(hostile["path"])
    assert not hostile["marker"].exists()


def test_load_run_refuses_it(hostile):
    with pytest.raises(ConfigError, match="refused"):
        load_run(hostile["path"])
    assert not hostile["marker"].exists()


def test_a_checkpoint_without_code_still_loads(hostile, tmp_path):
    clean = torch.load(hostile["run_dir"] / "checkpoints" / "hostile.ckpt", weights_only=False)
    hostile["marker"].unlink()
    del clean["payload"]
    torch.save(clean, tmp_path / "clean.ckpt")
    assert read_checkpoint(tmp_path / "clean.ckpt")["global_step"] == 2
