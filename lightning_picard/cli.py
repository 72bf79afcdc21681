"""The ``lightning-picard`` console script: LightningCLI with the Picard strategies registered.

``lightning-picard fit|validate|test|predict …`` is LightningCLI in subclass mode;
``lightning-picard demo`` runs :mod:`lightning_picard.demo`.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

import lightning_picard  # noqa: F401  (registers "picard", "picard_spawn", "picard_fork")


def main(args: list[str] | None = None) -> LightningCLI | None:
    """Run LightningCLI in subclass mode: ``lightning-picard fit -c config.yaml --trainer.strategy=picard``."""
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["demo"]:
        from lightning_picard.demo import main as demo_main

        demo_main(argv[1:])
        return None
    return LightningCLI(args=argv, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
