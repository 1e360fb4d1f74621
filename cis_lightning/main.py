"""The `cis` command: LightningCLI over CCModule and CCDataModule.

    cis fit --config configs/compressed_computation.yaml
    cis test --ckpt_path runs/compressed_computation/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from cis_lightning.datamodule import CCDataModule
from cis_lightning.errors import ConfigError
from cis_lightning.models import MLP, ResidualMLP  # noqa: F401  (short class names in configs)
from cis_lightning.module import CCModule

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
    "callbacks": [ModelCheckpoint(save_last=True, every_n_train_steps=1000)],
}


class CISCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data module owns the problem's size and the instance list; the network follows it.
        parser.link_arguments("data.n_features", "model.network.init_args.n_features", apply_on="instantiate")
        parser.link_arguments("data.seeds", "model.network.init_args.seeds", apply_on="instantiate")


def _with_run_config(args: list[str]) -> list[str]:
    """`cis test --ckpt_path RUN/checkpoints/x.ckpt` with no --config reads RUN/config.yaml."""
    if len(args) < 1 or args[0] not in ("test", "validate", "predict") or any(a.startswith("--config") for a in args):
        return args
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--ckpt_path=") else None
        if arg == "--ckpt_path" and i + 1 < len(args):
            value = args[i + 1]
        if value:
            config = Path(value).resolve().parent.parent / "config.yaml"
            if config.is_file():
                return [args[0], "--config", str(config), *args[1:]]
    return args


def main(args: list[str] | None = None) -> None:
    """The `cis` command on `args` (default: sys.argv[1:])."""
    run(args)


def run(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI on `args` (default: sys.argv[1:]) and return it (its .trainer has the run).

    Bad configuration exits 2 with one message naming the field.
    """
    from_command_line = args is None
    args = _with_run_config(list(sys.argv[1:] if from_command_line else args))
    if from_command_line:  # LightningCLI reads sys.argv itself; give it the completed arguments
        sys.argv[1:] = args
    try:
        return CISCLI(
            CCModule,
            CCDataModule,
            args=None if from_command_line else args,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=False,
        )
    except ConfigError as error:
        print(f"cis: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
