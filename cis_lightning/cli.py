"""The `cis` command.

    cis fit|validate|test|predict ...   LightningCLI over the model and the data module (lightning/cli.py)
    cis configs                         the shipped configs and callback presets, by the names --config takes
    cis report RUN_DIR...               the paper's report from finished runs (experiments/report.py)
    cis reproduce [--fast]              every experiment fitted and tested, then the report (experiments/reproduce.py)

The one module that knows every command; the layers below it import nothing from here.
"""

from __future__ import annotations

import sys

USAGE = "usage: cis {fit,validate,test,predict,configs,report,reproduce} ..."


def main(args: list[str] | None = None) -> None:
    """The `cis` command on `args` (default: sys.argv[1:])."""
    arguments = list(sys.argv[1:] if args is None else args)
    command = arguments[0] if arguments else None
    if command == "configs":
        from cis_lightning.runs.config_files import shipped_configs

        print("\n".join(shipped_configs()))
        print("pass one to --config by this name (or without configs/ and .yaml), e.g. cis fit --config mlp_gaussian")
    elif command == "report":
        from cis_lightning.experiments.report import main as report

        report(arguments[1:])
    elif command == "reproduce":
        from cis_lightning.experiments.reproduce import main as reproduce

        reproduce(arguments[1:])
    else:
        from cis_lightning.lightning.cli import run

        run(args)


if __name__ == "__main__":
    main()
