"""Dashboards of a recipe run: W&B (offline) and TensorBoard beside the CSV metrics, per-slot round errors, and
``lightning-picard plot``. One Picard smoke fit (one process, window 4) serves every test of this file."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from lightning_picard.convergence import first_unconverged
from recipes.cli import main, run_folder_loggers
from recipes.dashboard import heat_map_figure, read_rounds

SMOKE = Path(__file__).parents[2] / "recipes" / "configs" / "smoke" / "dreamgaussian.yaml"
LOGGERS = (
    "[{class_path: lightning.pytorch.loggers.WandbLogger, init_args: {offline: true}},"
    " {class_path: lightning.pytorch.loggers.TensorBoardLogger, init_args: {save_dir: .}}]"
)


@pytest.fixture(scope="module")
def picard_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    run_dir = tmp_path_factory.mktemp("dashboard") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        main(
            [
                "fit",
                "-c",
                str(SMOKE),
                "--run_dir",
                str(run_dir),
                "--trainer.strategy=lightning_picard.PicardStrategy",
                "--trainer.strategy.window_size=4",
                "--trainer.strategy.threshold=0.01",
                f"--trainer.logger={LOGGERS}",
            ]
        )
        import wandb

        wandb.finish()  # what the end of the `lightning-picard fit` process does
    return run_dir


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as file:
        return [row for row in csv.DictReader(file) if row.get("picard/skip")]


def test_the_run_folder_keeps_its_layout_with_other_loggers(picard_run):
    for name in ("config.yaml", "metrics.csv", "picard_rounds.csv", "checkpoints/last.ckpt", "run.json"):
        assert (picard_run / name).is_file(), name
    assert (picard_run / "test" / "turntable-step000006.mp4").stat().st_size > 0
    assert (picard_run / "plots" / "convergence.png").stat().st_size > 0
    assert list((picard_run / "val").glob("step000006-view*.png"))


def test_per_slot_errors_agree_with_the_logged_aggregates(picard_run):
    records = read_rounds(picard_run / "picard_rounds.csv")
    logged = metrics(picard_run)
    assert len(records) == len(logged) >= 2
    assert sum(r.skip for r in records) == 6  # max_steps
    before = [
        0.01,
        *(r.threshold for r in records[:-1]),
    ]  # each round compares against the previous threshold
    for record, row, threshold in zip(records, logged, before, strict=True):
        assert record.step == int(float(row["picard/window_start"])) == int(row["step"])
        assert record.skip == int(float(row["picard/skip"]))
        assert 1 <= len(record.errors) <= 4
        assert max(record.errors) == pytest.approx(float(row["picard/error_max"]), rel=1e-6)
        assert record.threshold == pytest.approx(float(row["picard/threshold"]), rel=1e-6)
        assert record.skip == first_unconverged(record.errors, threshold)


def test_wandb_offline_folder_holds_metrics_images_video_and_config(picard_run):
    (run,) = (picard_run / "wandb").glob("offline-run-*")
    files = run / "files"
    assert (files / "config.yaml").read_text() == (picard_run / "config.yaml").read_text()
    assert (files / "picard_rounds.csv").is_file()
    assert list((files / "media" / "images" / "val").glob("render_*.png"))
    assert list((files / "media" / "images" / "picard").glob("convergence_*.png"))
    assert list((files / "media" / "videos" / "test").glob("turntable_*.mp4"))
    log = next(run.glob("run-*.wandb")).read_bytes()  # the offline transaction log (protobuf records)
    for key in (b"picard/skip", b"picard/error_max", b"train/loss_sds", b"trainer/global_step", b"picard/*"):
        assert key in log, key


def test_tensorboard_events_hold_curves_images_turntable_and_config(picard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = picard_run.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert {"val/render", "picard/convergence", "test/turntable"} <= set(tags["images"])
    assert {"picard/skip", "picard/threshold", "train/loss_sds"} <= set(tags["scalars"])
    assert accumulator.Images("test/turntable")[0].encoded_image_string.startswith(b"GIF8")
    assert [e.step for e in accumulator.Scalars("picard/skip")] == [
        int(r["step"]) for r in metrics(picard_run)
    ]


def test_plot_renders_the_heat_map_and_curves(picard_run, tmp_path):
    paths = main(["plot", str(picard_run), "--out", str(tmp_path)])
    assert sorted(p.name for p in paths) == ["convergence.png", "curves.png"]
    import imageio.v3 as iio

    assert all(iio.imread(p).shape[0] > 200 for p in paths)


def test_plot_of_a_folder_without_metrics_says_what_to_pass(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "has no metrics.csv" in error


def test_a_sequential_run_has_no_heat_map():
    with pytest.raises(ValueError, match="no Picard rounds"):
        heat_map_figure([])


def test_chosen_loggers_write_into_the_run_folder_beside_a_csv_logger(tmp_path):
    from jsonargparse import Namespace

    default = run_folder_loggers(None, tmp_path)
    assert default.class_path.endswith("CSVLogger") and default.init_args.save_dir == str(tmp_path)
    assert run_folder_loggers(False, tmp_path) is False
    board = Namespace(
        class_path="lightning.pytorch.loggers.TensorBoardLogger",
        init_args=Namespace(save_dir=".", name="lightning_logs", version=None),
    )
    elsewhere = Namespace(
        class_path="lightning.pytorch.loggers.WandbLogger", init_args=Namespace(save_dir="/x")
    )
    loggers = run_folder_loggers([board, elsewhere], tmp_path)
    assert [item.class_path.rsplit(".", 1)[1] for item in loggers] == [
        "TensorBoardLogger",
        "WandbLogger",
        "CSVLogger",
    ]
    assert (board.init_args.save_dir, board.init_args.name, board.init_args.version) == (
        str(tmp_path),
        "",
        "",
    )
    assert elsewhere.init_args.save_dir == "/x"


def test_plot_of_a_sequential_run_draws_the_curves_only(picard_run, tmp_path):
    (tmp_path / "metrics.csv").write_text((picard_run / "metrics.csv").read_text())  # no picard_rounds.csv
    assert [p.name for p in main(["plot", str(tmp_path)])] == ["curves.png"]
    assert (tmp_path / "plots" / "curves.png").is_file()
