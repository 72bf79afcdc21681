"""The `lightning-picard` console script: LightningCLI with the strategy names registered."""

from pathlib import Path

from lightning_picard.cli import main

CONFIG = Path(__file__).parent / "configs" / "toy_picard.yaml"


def test_cli_runs_a_picard_fit_from_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "-c", str(CONFIG)])
    assert cli.trainer.global_step == 6
    assert "picard/rounds" in cli.trainer.callback_metrics


def test_cli_accepts_the_registered_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "-c", str(CONFIG), "--trainer.strategy=picard", "--trainer.max_steps=2"])
    assert cli.trainer.global_step == 2
    assert cli.trainer.strategy.window_size == 1
