"""The plugin's own command line: LightningCLI with the Picard strategies registered.

``python -m lightning_picard.cli fit|validate|test|predict …`` is LightningCLI in subclass mode for any
LightningModule; ``python -m lightning_picard.cli demo`` runs the regression toy of :mod:`lightning_picard.demo`.
The installed ``lightning-picard`` script is ``recipes.cli``: the same, plus run folders, ``export`` and the
text-to-3D demo.
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
