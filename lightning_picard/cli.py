"""The ``lightning-picard`` console script: LightningCLI with the Picard strategies registered."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

import lightning_picard  # noqa: F401  (registers "picard", "picard_spawn", "picard_fork")


def main(args: list[str] | None = None) -> LightningCLI:
    """Run LightningCLI in subclass mode: ``lightning-picard fit -c config.yaml --trainer.strategy=picard``."""
    return LightningCLI(args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
