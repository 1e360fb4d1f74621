"""The `cis` command: LightningCLI over CCModule and CCDataModule.

cis fit --config configs/compressed_computation.yaml
cis test --ckpt_path runs/compressed_computation/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentError, Namespace, get_loader, set_loader
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cis_lightning.core.baselines import SVD, Naive, NaiveOffset, SemiNMF, Zero  # noqa: F401  (baselines by short name)
from cis_lightning.core.errors import ConfigError, require
from cis_lightning.core.models import MLP, ResidualMLP  # noqa: F401  (short class names in configs)
from cis_lightning.core.sizes import check_memory, sizes_from_config
from cis_lightning.core.task import grid_size
from cis_lightning.lightning.checkpointing import AtomicCheckpointIO, RunCheckpoint, check_fits, read_checkpoint
from cis_lightning.lightning.datamodule import CCDataModule
from cis_lightning.lightning.interrupts import EXIT_SIGINT, CtrlC, Interrupted
from cis_lightning.lightning.module import CCModule, TrainingDiverged
from cis_lightning.lightning.run_directory import RunDirectory
from cis_lightning.runs.config_files import check_arguments, check_yaml, find_config
from cis_lightning.runs.loading import check_same_task

TRAINER_DEFAULTS = {
    "max_steps": 10_000,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "cis"},
    },
    "log_every_n_steps": 50,
    # The training stream is endless: validate by steps, not epochs.
    "check_val_every_n_epoch": None,
    "val_check_interval": 2500,
    "num_sanity_val_steps": 0,
}
# The checkpoint callback is the CLI's `checkpoint` section (a fresh RunCheckpoint per run):
# --checkpoint.every_n_train_steps N sets how often last.ckpt is written.
CHECKPOINT_DEFAULTS = {"every_n_train_steps": 1000, "save_last": True, "enable_version_counter": False}
# Exit status of a run stopped by SIGTERM after saving its checkpoint (128 + 15, the shell's convention).
EXIT_SIGTERM = 143
# Exit status when the file system fails under a run (sysexits.h's EX_IOERR).
EXIT_FILE_SYSTEM = 74
# Steps between redraws of the default progress bar (Lightning's own default redraws every step, a
# terminal write per step for a step that does little work); a bar the config brings keeps its own rate.
PROGRESS_BAR_REFRESH = 25


class _Parser(LightningArgumentParser):
    """Dumps (--print_config, the run's config.yaml) end with a comment giving the grid's size."""

    def dump(self, cfg: Namespace, *args: Any, **kwargs: Any) -> str:
        text = super().dump(cfg, *args, **kwargs)
        data = cfg.get("data") if isinstance(cfg, Namespace) else None
        if not isinstance(data, Namespace) or text.lstrip().startswith("{"):  # JSON has no comments
            return text
        grid = data.get("grid")
        n = grid_size(grid) if isinstance(grid, dict) else 1
        return text + f"# data.grid expands to K = {n} instance{'s' if n != 1 else ''}\n"


class CISCLI(LightningCLI):
    def __init__(self, *args: Any, run_directory: RunDirectory | None = None, **kwargs: Any) -> None:
        self.run_directory = run_directory or RunDirectory()  # claimed by rank zero before anything is written
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any):
        # Parse errors raise (run() prints them as one line) instead of printing the whole usage.
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # The data module owns the problem's size and the instance list; the network follows it.
        parser.link_arguments("data.n_features", "model.network.init_args.n_features", apply_on="instantiate")
        parser.link_arguments("data.seeds", "model.network.init_args.seeds", apply_on="instantiate")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({f"checkpoint.{key}": value for key, value in CHECKPOINT_DEFAULTS.items()})

    def before_instantiate_classes(self) -> None:
        # Sizes that cannot fit are refused here, before the model and data allocate anything.
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        data = config.get("data")
        model = config.get("model")
        if not isinstance(data, Namespace) or not isinstance(model, Namespace):
            return
        grid, shard = data.get("grid"), str(data.get("shard") or "1/1").partition("/")[2]
        try:
            instances = grid_size(grid) if isinstance(grid, dict) else 1
        except (TypeError, ValueError):
            return  # a malformed grid: the data module names the problem
        instances = -(-instances // int(shard)) if shard.isdigit() and int(shard) > 0 else instances
        sizes = sizes_from_config(data, model.get("network"), instances)
        if sizes is not None:
            accelerator = config.get("trainer", Namespace()).get("accelerator", "cpu")
            check_memory(sizes, training=self.subcommand == "fit", accelerator=accelerator)

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        self._checkpoint = None
        subcommand = self.config.get("subcommand")
        if subcommand is not None and "ckpt_path" in self.config[subcommand]:
            self._prepare_checkpoint(subcommand, self.config[subcommand])

    def _prepare_checkpoint(self, subcommand: str, config: Namespace) -> None:
        """Weights-only loading always; `last` is the run's own last.ckpt; a bad file stops here.

        Checked before anything is instantiated, so a bad checkpoint leaves no run directory.
        """
        only_data = config.get("weights_only") is not False
        require(only_data, "weights_only", "must be true: cis reads checkpoints as data only")
        config.weights_only = True
        path, version = config.ckpt_path, None
        if path == "last":
            path, version = self._last_checkpoint(subcommand, config)
            config.ckpt_path = path
        if path is None or path in ("best", "last", "hpc"):
            return
        self._checkpoint = (path, read_checkpoint(path))
        layout = _logger_layout(config)
        if subcommand == "fit" and version is not None:
            # Resume in the run's own version directory; TensorBoard drops the events that the
            # interrupted run wrote after this checkpoint, so the curve has each step once.
            init_args = layout[0]
            init_args.version = version
            if "purge_step" in init_args:
                init_args.purge_step = int(self._checkpoint[1].get("global_step", 0))
        elif subcommand != "fit" and layout is not None:
            # A resumed fit's config.yaml (which `cis test --ckpt_path RUN/...` reads) names the fit's
            # own version and a purge step: evaluation must neither write into nor purge that run.
            init_args, root = layout
            if "purge_step" in init_args:
                init_args.purge_step = None
            version = init_args.get("version")
            if version is not None and _version_dir(root, version) == Path(path).resolve().parent.parent:
                init_args.version = None

    @staticmethod
    def _last_checkpoint(subcommand: str, config: Namespace) -> tuple[str | None, str | None]:
        """(RUN/checkpoints/last.ckpt of the newest run of this logger, save_dir/name/version_*; RUN's version).

        None for `fit` when there is none yet, so the same command starts a run and resumes it.
        """
        layout = _logger_layout(config)
        if config.get("checkpoint", Namespace()).get("dirpath") or layout is None:
            return "last", None  # no version layout to search: Lightning looks in the callback's directory
        init_args, root = layout
        version = init_args.get("version")
        runs = [_version_dir(root, version)] if version is not None else []
        found = [run / "checkpoints" / "last.ckpt" for run in runs or root.glob("version_*")]
        found = [path for path in found if path.is_file()]
        if not found:
            require(subcommand == "fit", "ckpt_path", f"last: there is no checkpoints/last.ckpt under {root}")
            rank_zero_info(f"cis: no checkpoints/last.ckpt under {root}: starting a new run")
            return None, None
        last = max(found, key=lambda path: path.stat().st_mtime)
        return str(last), last.parent.parent.name

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # The model and data exist now: a checkpoint of another shape stops before the trainer does.
        if self._checkpoint is not None:
            path, checkpoint = self._checkpoint
            expected = {f"network.{k}": v for k, v in self.model.network.state_dict().items()}
            expected.update({f"task.{k}": v for k, v in self.datamodule.task.state_dict().items()})
            check_fits(checkpoint, expected, path)
            check_same_task(checkpoint, self.datamodule.task, path)
            self._checkpoint = None
        # Atomic checkpoint writes and weights-only reads, unless the config names its own CheckpointIO.
        config = self.config_init if self.subcommand is None else self.config_init[self.subcommand]
        trainer = config.get("trainer", {})
        plugins = trainer.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())
        callbacks = trainer.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, TQDMProgressBar(refresh_rate=PROGRESS_BAR_REFRESH)]
        try:
            trainer = super().instantiate_trainer(plugins=plugins, **kwargs)
        except ConfigError:
            raise
        except (ModuleNotFoundError, ValueError) as error:  # e.g. an accelerator whose package is missing
            raise ConfigError("trainer", " ".join(str(error).split())) from None
        return trainer

    def before_fit(self) -> None:
        max_steps = self.trainer.max_steps
        require(max_steps > 0, "trainer.max_steps", f"must be a positive integer, got {max_steps}")
        world, batch = self.trainer.world_size, self.datamodule.batch_size
        require(batch % world == 0, "data.batch_size", f"(global batch) must divide by the {world} ranks, got {batch}")
        interval = self.trainer.val_check_interval
        require(interval > 0, "trainer.val_check_interval", f"must be > 0 (steps between validations), got {interval}")
        self.run_directory.claim(self.trainer, self.config["fit"].get("ckpt_path"), fit=True)

    # Evaluation writes config.yaml and results.csv: the same claim (a new directory, locked while it runs).
    def before_test(self) -> None:
        self.run_directory.claim(self.trainer, None, fit=False)

    def before_validate(self) -> None:
        self.run_directory.claim(self.trainer, None, fit=False)

    def before_predict(self) -> None:
        self.run_directory.claim(self.trainer, None, fit=False)


def _logger_layout(config: Namespace) -> tuple[Namespace, Path] | None:
    """(the logger's init_args, save_dir/name) for a logger with the save_dir/name/version_<n> layout."""
    logger = config.trainer.get("logger")
    init_args = logger.get("init_args") if isinstance(logger, Namespace) else None
    if init_args is None or init_args.get("save_dir") is None:
        return None
    return init_args, Path(init_args.save_dir) / (init_args.get("name") or "")


def _version_dir(root: Path, version: int | str) -> Path:
    """The run directory of `version` (TensorBoardLogger and CSVLogger: an int n is version_<n>)."""
    return (root / (version if isinstance(version, str) else f"version_{version}")).resolve()


def _with_shipped_configs(args: list[str]) -> list[str]:
    """Every `--config NAME` that is no file but names a shipped config (`cis configs` lists them) as its
    file: `--config mlp_gaussian` or `--config configs/mlp_gaussian.yaml` work outside a checkout too."""
    args = list(args)
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            args[i + 1] = find_config(args[i + 1])
        elif arg.startswith("--config="):
            args[i] = "--config=" + find_config(arg.removeprefix("--config="))
    return args


def _with_run_config(args: list[str]) -> list[str]:
    """`cis test --ckpt_path RUN/checkpoints/x.ckpt` with no --config reads RUN/config.yaml.

    With neither a config nor model arguments the checkpoint must be a file with RUN/config.yaml beside
    it: otherwise the message says which, not that model.network is missing.
    """
    if len(args) < 1 or args[0] not in ("test", "validate", "predict") or any(a.startswith("--config") for a in args):
        return args
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--ckpt_path=") else None
        if arg == "--ckpt_path" and i + 1 < len(args):
            value = args[i + 1]
        if value and value not in ("last", "best", "hpc", "registry"):
            config = Path(value).resolve().parent.parent / "config.yaml"
            if config.is_file() and Path(value).is_file():
                return [args[0], "--config", str(config), *args[1:]]
            if any(a.startswith("--model") for a in args):
                return args  # a model given on the command line: the checkpoint is checked against it
            require(Path(value).exists(), "ckpt_path", f"{value} does not exist")
            require(not Path(value).is_dir(), "ckpt_path", f"{value} is a directory: give a checkpoint file")
            raise ConfigError(
                "ckpt_path",
                f"no config.yaml beside {value} (looked for {config}): give the run's config with --config",
            )
    return args


def _check_yaml_in_jsonargparse() -> None:
    """Every YAML text that jsonargparse loads (config files, nested ones, values) passes `check_yaml` first.

    Through jsonargparse's public `set_loader`; the arguments' own files and values were checked
    before, naming their field, so this catches what they include.
    """
    loader = get_loader("yaml")
    if getattr(loader, "checked", False):
        return

    def checked(text: str) -> Any:
        check_yaml(text, "config")
        return loader(text)

    checked.checked = True
    set_loader("yaml", checked, exceptions=(yaml.YAMLError,))


def run(args: list[str] | None = None, callbacks: list[Callback] | None = None) -> LightningCLI:
    """Run the CLI on `args` (default: sys.argv[1:]) and return it (its .trainer has the run).

    `callbacks`: added to the trainer's (LightningCLI's `trainer_defaults`), not to the saved config:
    for a caller that watches the run, like `cis reproduce`'s progress lines.

    Bad configuration exits 2 with one message naming the field, a diverging run 1 (its last good
    checkpoint kept), a run stopped by SIGTERM EXIT_SIGTERM and by Ctrl-C EXIT_SIGINT after saving
    last.ckpt, a file-system fault during a run EXIT_FILE_SYSTEM; never a traceback (docs/reliability.md).
    """
    _check_yaml_in_jsonargparse()
    from_command_line = args is None
    ctrl_c = CtrlC()
    try:
        with ctrl_c, RunDirectory() as run_directory:
            args = _with_run_config(_with_shipped_configs(list(sys.argv[1:] if from_command_line else args)))
            check_arguments(args)
            if from_command_line:  # LightningCLI reads sys.argv itself; give it the completed arguments
                sys.argv[1:] = args
            return CISCLI(
                CCModule,
                CCDataModule,
                args=None if from_command_line else args,
                trainer_defaults={**TRAINER_DEFAULTS, "callbacks": list(callbacks or [])},
                save_config_callback=SaveConfigCallback,
                parser_class=_Parser,
                save_config_kwargs={"overwrite": True},
                seed_everything_default=False,
                run_directory=run_directory,
            )
    except ConfigError as error:
        _fail(str(error))
    except ArgumentError as error:
        _fail(_parse_error_message(error))
    except MisconfigurationException as error:
        _fail(f"trainer: {' '.join(str(error).split())}")
    except TrainingDiverged as error:
        _fail(str(error), status=1)
    except SIGTERMException:
        signal_name = "Ctrl-C (SIGINT)" if ctrl_c.received else "SIGTERM"
        hint = "the same command with --ckpt_path last resumes the run" if args[:1] == ["fit"] else "no results written"
        print(f"cis: stopped by {signal_name}; {hint}", file=sys.stderr)
        raise SystemExit(EXIT_SIGINT if ctrl_c.received else EXIT_SIGTERM) from None
    except Interrupted:
        _fail("interrupted by Ctrl-C (SIGINT) before training started; nothing was saved", status=EXIT_SIGINT)
    except UnicodeDecodeError as error:  # a file that jsonargparse read (the arguments' own were checked)
        _fail(f"config: a file given is not UTF-8 text (byte {error.start}: {error.reason})")
    except (MemoryError, RuntimeError) as error:  # the allocator, past the estimate of cis_lightning.core.sizes
        text = " ".join(str(error).split())
        if not isinstance(error, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in text:
            raise
        problem = (re.search(r"tried to allocate [\d.]+ \w+", text) or re.search(r".{0,80}", text)).group(0)
        _fail(f"out of memory ({problem}): make data.batch_size, data.eval_batch_size or the model smaller", status=1)
    except OSError as error:  # the file system failed under a run (full disk, a directory made read-only)
        where = f"{error.filename}: " if error.filename else ""
        _fail(f"file system: {where}{error.strerror or error}", status=EXIT_FILE_SYSTEM)


def _fail(message: str, status: int = 2) -> None:
    """One line on stderr, no traceback, and the exit status (2: bad input, 1: training failed)."""
    print(f"cis: error: {message}", file=sys.stderr)
    raise SystemExit(status) from None


def _parse_error_message(error: ArgumentError) -> str:
    """jsonargparse's 'Parser key "model.lr": Expected a <class 'float'>. Got value: abc' as one line."""
    text = str(error).strip()
    match = re.match(r'Parser key "([^"]+)":\s*(.*)', text, re.S)
    if match:
        field, problem = match.groups()
    else:  # a YAML syntax error names no key: it is the config file's
        field, problem = ("config" if text.startswith("Problems parsing config") else None), text
    problem = re.sub(r"Expected a <class '([\w.]+)'>", r"expected type \1", " ".join(problem.split()))
    if len(problem) > 400:
        problem = problem[:400] + " ..."
    return f"{field}: {problem}" if field else problem
