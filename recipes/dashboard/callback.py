"""The :class:`Dashboard` callback: a run's curves, renders, turntable, config and convergence heat map, on
whichever loggers the Trainer has (W&B, TensorBoard, CSV)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from recipes.dashboard.plots import _pyplot, heat_map_figure
from recipes.dashboard.rounds import RoundRecorder
from recipes.export.video import image_grid, save_image, to_uint8, write_video

STEP_AXIS = "trainer/global_step"
"""The x axis of every curve: the optimizer step (Lightning's WandbLogger adds it to every logged row)."""
STEP_METRICS = ("picard/*", "train/*", "val/*", "test/*")


class Dashboard(pl.Callback):
    """What a run shows on its loggers, rank 0 only. Per logger type:

    - every logger: the resolved ``config.yaml`` as hyperparameters; the ``picard/*`` and ``train/*`` curves are
      logged by the strategy and the module themselves, over the optimizer step;
    - W&B (:class:`~lightning.pytorch.loggers.WandbLogger`): ``define_metric`` puts ``picard/*``, ``train/*``,
      ``val/*`` and ``test/*`` on the ``trainer/global_step`` axis, so that a Picard run's curves line up with its
      sequential run's; validation renders (``val/render``), the turntable (``test/turntable``, mp4), the heat map
      (``picard/convergence``) and the files ``config.yaml`` and ``picard_rounds.csv``;
    - TensorBoard: the same images, the turntable as an animated GIF in the images tab, the config as text;
    - CSV (and the run folder, whatever the logger): ``metrics.csv``, ``picard_rounds.csv`` (per-slot errors,
      :class:`~recipes.dashboard.rounds.RoundRecorder`), ``plots/convergence.png``, ``val/``, ``test/``.

    Validation renders appear as often as the Trainer validates (``trainer.val_check_interval`` steps).

    Args:
        turntable: render the datamodule's test views (the turntable, ``n_test_views``) at the end of fit into
            ``RUN/test/turntable-stepNNNNNN.{mp4,gif,png}`` (what ``lightning-picard test`` writes) and log the
            video. Default is True.
        heat_map: draw the convergence heat map at the end of a Picard fit into ``RUN/plots/convergence.png`` and
            log it. Default is True.
        fps: frames per second of the turntable video. Default is 30.
    """

    def __init__(self, turntable: bool = True, heat_map: bool = True, fps: int = 30) -> None:
        self.turntable = turntable
        self.heat_map = heat_map
        self.fps = fps
        self.recorder = RoundRecorder()

    # --- the per-slot errors ------------------------------------------------------------------------------

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.recorder.on_train_start(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.recorder.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    # --- start: axes and config ------------------------------------------------------------------------------

    @override
    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_dir = Path(trainer.default_root_dir)
        config_path = run_dir / "config.yaml"
        config = yaml.safe_load(config_path.read_text()) if config_path.exists() else None
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                experiment = logger.experiment
                experiment.define_metric(STEP_AXIS)
                for pattern in STEP_METRICS:
                    experiment.define_metric(pattern, step_metric=STEP_AXIS)
                if config is not None:
                    experiment.save(str(config_path), base_path=str(run_dir), policy="now")
            elif isinstance(logger, TensorBoardLogger) and config is not None:
                logger.experiment.add_text("config", f"```yaml\n{config_path.read_text()}\n```", 0)
            if config is not None and not isinstance(logger, CSVLogger):  # CSV: config.yaml is beside it
                logger.log_hyperparams(config)

    # --- validation renders --------------------------------------------------------------------------------

    @override
    @rank_zero_only
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        step = trainer.global_step
        paths = sorted((Path(trainer.default_root_dir) / "val").glob(f"step{step:06d}-view*.png"))
        if paths:
            self._log_images(trainer, "val/render", paths, step)

    # --- end: turntable and heat map -----------------------------------------------------------------------

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.recorder.on_train_end(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the Trainer's teardown (so not in the run's ``fit_seconds``), before the loggers are finalised."""
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        run_dir = Path(trainer.default_root_dir)
        if self.heat_map and self.recorder.records:
            plt = _pyplot()
            figure = heat_map_figure(self.recorder.records, title=f"Picard convergence: {run_dir.name}")
            path = run_dir / "plots" / "convergence.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            figure.savefig(path, dpi=110)
            plt.close(figure)
            self._log_images(trainer, "picard/convergence", [path], step)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.experiment.save(
                        str(self.recorder.path(trainer)), base_path=str(run_dir), policy="now"
                    )
        if self.turntable:
            video = self._write_turntable(trainer, pl_module, run_dir / "test" / f"turntable-step{step:06d}")
            if video is not None:
                self._log_video(trainer, "test/turntable", video, step)

    def _write_turntable(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stem: Path) -> Path | None:
        datamodule = trainer.datamodule
        render = getattr(pl_module, "render_views", None)
        if datamodule is None or not hasattr(datamodule, "test_dataloader") or render is None:
            return None
        device = pl_module.device
        pl_module.to(trainer.strategy.root_device)  # the teardown moved it to the CPU
        try:
            frames = torch.cat([render(cameras).cpu() for cameras in datamodule.test_dataloader()])
        finally:
            pl_module.to(device)
        write_video(stem.with_suffix(".gif"), frames, self.fps)
        save_image(stem.with_suffix(".png"), image_grid(frames[:: max(1, len(frames) // 8)][:8]))
        return write_video(stem.with_suffix(".mp4"), frames, self.fps)

    # --- per logger ----------------------------------------------------------------------------------------

    @staticmethod
    def _log_images(trainer: pl.Trainer, key: str, paths: list[Path], step: int) -> None:
        import imageio.v3 as iio

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=[str(p) for p in paths], step=step)
            elif isinstance(logger, TensorBoardLogger):
                for i, path in enumerate(paths):
                    tag = key if len(paths) == 1 else f"{key}/{i:02d}"
                    logger.experiment.add_image(
                        tag, to_uint8(iio.imread(path)[..., :3]), step, dataformats="HWC"
                    )

    def _log_video(self, trainer: pl.Trainer, key: str, mp4: Path, step: int) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({key: wandb.Video(str(mp4), format="mp4"), STEP_AXIS: step})
            elif isinstance(logger, TensorBoardLogger):
                _tensorboard_gif(logger, key, mp4.with_suffix(".gif"), step)


def _tensorboard_gif(logger: Logger, tag: str, gif: Path, step: int) -> None:
    """An animated GIF in TensorBoard's images tab (``add_video`` would need moviepy)."""
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    with Image.open(gif) as image:
        width, height = image.size
    encoded = gif.read_bytes()
    summary = Summary(
        value=[
            Summary.Value(
                tag=tag,
                image=Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=encoded),
            )
        ]
    )
    logger.experiment._get_file_writer().add_summary(summary, step)
