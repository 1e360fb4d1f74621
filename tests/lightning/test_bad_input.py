"""Bad configs and command lines: one clean message naming the field, no traceback, no run directory.

Every case runs the real CLI in-process (`run`), which is what the `cis` command calls; a traceback
would reach pytest as an exception other than SystemExit and fail the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cis_lightning.lightning.cli import run
from tests.conftest import tiny_args

# run() is called with explicit args while pytest's own argv is in sys.argv.
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
CHECKPOINT_STEPS = 1


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A real last.ckpt of a 50-neuron MLP, a text file, a YAML syntax error and a path with no file."""
    root = tmp_path_factory.mktemp("bad_input")
    paths = {}
    cli = run(["fit", *tiny_args(root, steps=CHECKPOINT_STEPS)])
    paths["mlp"] = Path(cli.trainer.checkpoint_callback.last_model_path)
    assert paths["mlp"].is_file()
    paths["text"] = root / "notes.ckpt"
    paths["text"].write_text("this is not a checkpoint\n")
    paths["broken_yaml"] = root / "broken.yaml"
    paths["broken_yaml"].write_text("model:\n  lr: [0.1\n")
    paths["missing"] = root / "no_such_file.ckpt"
    return paths


# (id, extra arguments, text the message must contain: the field, then the problem). "{name}" is
# replaced by the path of the `checkpoints` fixture's file of that name.
CASES = [
    ("lr_not_a_number", ["--model.lr", "abc"], "model.lr", "abc"),
    ("lr_negative", ["--model.lr", "-1"], "model.lr", "> 0"),
    ("weight_decay_negative", ["--model.weight_decay", "-0.1"], "model.weight_decay", ">= 0"),
    ("batch_size_zero", ["--data.batch_size", "0"], "data.batch_size", "positive integer"),
    ("batch_size_float", ["--data.batch_size", "1.5"], "data.batch_size", "int"),
    ("p_zero", ["--data.feature_probability", "0"], "data.feature_probability", "(0, 1]"),
    ("sigma_negative", ["--data.sigma", "-0.1"], "data.sigma", ">= 0"),
    ("sigma_nan", ["--data.sigma", "nan"], "data.sigma", "nan"),
    ("n_features_zero", ["--data.n_features", "0"], "data.n_features", "positive integer"),
    ("d_mlp_zero", ["--model.network.init_args.d_mlp", "0"], "d_mlp", "positive integer"),
    ("tied_not_bool", ["--model.network.init_args.tied", "3"], "tied", "bool"),
    ("unknown_mixing_kind", ["--data.mixing.kind", "banana"], "data.mixing.kind", "banana"),
    ("low_rank_without_rank", ["--data.mixing.kind", "low_rank"], "data.mixing.rank", "low_rank"),
    ("rank_below_one", ["--data.mixing.kind", "low_rank", "--data.mixing.rank", "0"], "data.mixing.rank", "got 0"),
    ("unknown_model_name", ["--model.network.class_path", "Transformer"], "model.network", "Transformer"),
    ("grid_value_not_a_list", ["--data.grid", '{"sigma": 0.1}'], "data.grid", "list"),
    ("shard_out_of_range", ["--data.shard", "2/2"], "data.shard", "0 <= i < N"),
    ("grid_unknown_key", ["--data.grid", '{"banana": [1]}'], "data.grid.banana", "unknown grid key"),
    ("max_steps_not_a_number", ["--trainer.max_steps", "abc"], "trainer.max_steps", "abc"),
    ("max_steps_zero", ["--trainer.max_steps", "0"], "trainer.max_steps", "positive integer"),
    ("val_check_interval_zero", ["--trainer.val_check_interval", "0"], "trainer.val_check_interval", "> 0"),
    ("devices_zero", ["--trainer.devices", "0"], "trainer", "devices"),
    ("unknown_option", ["--data.batch_sise", "8"], "data.batch_sise", "unrecognized"),
    ("missing_config_file", ["--config", "{missing}"], "config", "does not exist"),
    ("yaml_syntax_error", ["--config", "{broken_yaml}"], "config", "line 2"),
    (
        "batch_not_divisible_by_ranks",
        ["--data.batch_size=255", "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"],
        "data.batch_size",
        "2 ranks",
    ),
    ("missing_checkpoint", ["--ckpt_path", "{missing}"], "ckpt_path", "no checkpoint file"),
    ("checkpoint_not_a_checkpoint", ["--ckpt_path", "{text}"], "ckpt_path", "not a readable checkpoint"),
    ("checkpoint_other_width", ["--ckpt_path", "{mlp}", "--model.network.init_args.d_mlp", "20"], "ckpt_path", "shape"),
    (
        "checkpoint_other_model",
        ["--ckpt_path", "{mlp}", "--model.network.class_path", "ResidualMLP"],
        "ckpt_path",
        "fit",
    ),
    ("weights_only_false", ["--ckpt_path", "{mlp}", "--weights_only", "false"], "weights_only", "data only"),
]


def _expand(args: list[str], checkpoints: dict[str, Path]) -> list[str]:
    return [str(checkpoints[a[1:-1]]) if a.startswith("{") and a[1:-1] in checkpoints else a for a in args]


def assert_fails_cleanly(args: list[str], save_dir: Path, capsys, field: str, problem: str) -> None:
    with pytest.raises(SystemExit) as stopped:
        run(args)
    assert stopped.value.code == 2
    out, err = capsys.readouterr()
    messages = [line for line in err.splitlines() if line.startswith("cis: error:")]
    assert len(messages) == 1, err
    assert field in messages[0] and problem in messages[0], messages[0]
    assert "Traceback" not in out + err
    assert not save_dir.exists(), sorted(str(p) for p in save_dir.rglob("*"))


def test_the_table_has_at_least_25_cases():
    assert len(CASES) >= 25
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize(("extra", "field", "problem"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_fit_input_gives_one_message_and_no_run_directory(extra, field, problem, checkpoints, tmp_path, capsys):
    save_dir = tmp_path / "runs"
    args = ["fit", *tiny_args(save_dir), *_expand(extra, checkpoints)]
    assert_fails_cleanly(args, save_dir, capsys, field, problem)


@pytest.mark.parametrize(
    ("extra", "field", "problem"),
    [
        (["--ckpt_path", "last"], "ckpt_path", "no checkpoints/last.ckpt"),
        (["--ckpt_path", "{mlp}", "--model.network.init_args.d_mlp", "20"], "ckpt_path", "shape"),
    ],
    ids=["last_without_runs", "checkpoint_other_width"],
)
def test_bad_test_input_gives_one_message_and_no_run_directory(extra, field, problem, checkpoints, tmp_path, capsys):
    save_dir = tmp_path / "runs"
    args = ["test", *tiny_args(save_dir), *_expand(extra, checkpoints)]
    assert_fails_cleanly(args, save_dir, capsys, field, problem)
