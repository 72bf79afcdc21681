"""Per-round time of a rank's Picard slots evaluated one by one against one batch (``model.batched_slots``).

One device, window ``P`` (all slots on it). For each recipe configuration, runs in this process one after another:

- ``sequential``: ``strategy="auto"`` (the recipe adds :class:`lightning_picard.StepSeed`): one optimizer step, t_seq;
- ``one-by-one P``: ``PicardStrategy(window_size=P, threshold=0)``: a round evaluates P slots one after another;
- ``batched P``: the same with ``model.batched_slots=true``: P renders, one denoiser call, one backward.

``threshold=0`` makes every round a full window of P evaluations whatever the convergence, so the per-round time
is the cost of a round, not of a trajectory. Rounds are timed between round ends (``at_round_end``; CUDA
synchronised), only rounds of P slots (the window is cut before ``max_steps``), after ``--warmup`` rounds; the
median is reported. Each (configuration, P) pair is measured in both orders (one-by-one first, then batched
first): the machine may be shared, and its load average is printed next to each figure.

What it says about a run: a Picard run that converges at T/R steps per round on one device takes
R·t_round against T·t_seq sequentially, so its speedup is (T/R)·t_seq/t_round. The script prints the
break-even T/R (t_round/t_seq) and that speedup at T/R = P/2, 0.8·P and P, labelled as projections.

CPU (what docs/benchmarks.md reports)::

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/batched_slots.py

GPU (DreamGaussian- and DreamFusion-size steps with a randomly initialised Stable Diffusion 2.1 base UNet and VAE
in fp16, built from config into ``--random-sd`` once; speed does not depend on the weights)::

    PYTHONPATH=. .venv/bin/python benchmarks/batched_slots.py --device cuda --random-sd /tmp/random-sd21

``--denoiser-only`` times just the guidance call of a round (P calls on one step's latents against one call on P
steps' latents, interleaved, CFG included): the part batching changes, robust to a loaded machine.

``--configs`` picks configurations by name (``--list`` shows them); ``--override`` adds LightningCLI arguments to
every one (e.g. ``--override=--data.init_args.cameras.batch_size=4``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_picard import PicardStrategy, at_round_end

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"


@dataclass
class Setting:
    """A recipe configuration to time: a config file and overrides."""

    name: str
    config: Path
    overrides: list[str] = field(default_factory=list)
    device: str = "cpu"


def cpu_settings() -> list[Setting]:
    dreamfusion_32 = [
        "--model.init_args.guidance.closed_form.height=32",
        "--data.init_args.cameras.height=32",
        "--data.init_args.cameras.width=32",
        "--data.init_args.eval_height=32",
        "--data.init_args.eval_width=32",
        "--model.init_args.scene.init_args.renderer.num_samples_per_ray=64",
    ]
    return [
        Setting("dreamgaussian-smoke", CONFIGS / "smoke" / "dreamgaussian.yaml"),
        Setting("dreamgaussian-demo", CONFIGS / "demo" / "dreamgaussian.yaml"),
        Setting("dreamfusion-smoke", CONFIGS / "smoke" / "dreamfusion.yaml"),
        Setting("dreamfusion-32px", CONFIGS / "smoke" / "dreamfusion.yaml", dreamfusion_32),
    ]


def gpu_settings(random_sd: Path) -> list[Setting]:
    sd = [
        "--model.init_args.guidance.model=stable-diffusion",
        f"--model.init_args.guidance.pretrained_model_name_or_path={random_sd}",
    ]
    at_512 = [
        "--data.init_args.cameras.height=[512, 512, 512]",
        "--data.init_args.cameras.width=[512, 512, 512]",
    ]
    return [  # DreamGaussian renders 128x128 for its first 150 steps, then 256 and 512; the UNet always sees 64x64
        Setting("dreamgaussian-sd21", CONFIGS / "dreamgaussian.yaml", sd, "cuda"),
        Setting("dreamgaussian-sd21-512px", CONFIGS / "dreamgaussian.yaml", sd + at_512, "cuda"),
        Setting("dreamfusion-sd21", CONFIGS / "dreamfusion-sd.yaml", sd, "cuda"),
    ]


def build_random_sd21(folder: Path) -> Path:
    """A randomly initialised Stable Diffusion 2.1 base (UNet and VAE at full size) in the diffusers layout.

    The text encoder is a one-layer CLIP of width 1024 (the UNet's cross-attention width) with 77 positions: the
    prompt is embedded once per run, so its size does not change the step time.
    """
    if (folder / "model_index.json").is_file():
        return folder
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(ROOT / "tests" / "recipes"))
    from tiny_models import SD_SCHEDULER, _byte_level_clip_vocab

    torch.manual_seed(0)
    vocab, merges = _byte_level_clip_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=1024,
            intermediate_size=1024,
            num_attention_heads=16,
            num_hidden_layers=1,
            max_position_embeddings=77,
            bos_token_id=len(tokenizer) - 2,
            eos_token_id=len(tokenizer) - 1,
            pad_token_id=len(tokenizer) - 1,
        )
    )
    unet = UNet2DConditionModel(  # stabilityai/stable-diffusion-2-1-base's unet/config.json
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(  # its vae/config.json
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        norm_num_groups=32,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER, prediction_type="epsilon", set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return folder


class RoundTimer(pl.Callback):
    """Times between round ends (``on_train_batch_end`` of a Picard round's last step, or every sequential step)."""

    def __init__(self, slots: int | None) -> None:
        self.slots = slots
        self.marks: list[tuple[float, bool]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if not at_round_end(trainer):
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        full = True
        if self.slots is not None:
            result = trainer.strategy.last_round
            full = result is not None and len(result.errors) == self.slots
        self.marks.append((time.perf_counter(), full))

    def durations(self, warmup: int) -> list[float]:
        return [t1 - t0 for (t0, _), (t1, full) in zip(self.marks, self.marks[1:]) if full][warmup:]


def time_run(setting: Setting, window: int | None, batched: bool, steps: int, warmup: int) -> float:
    """Median seconds per round (per step when ``window`` is None) of one short fit."""
    from recipes.cli import RecipeCLI

    args = ["-c", str(setting.config), *setting.overrides, f"--data.init_args.num_steps={steps}"]
    if batched:
        args.append("--model.init_args.batched_slots=true")
    cli = RecipeCLI(args=args, run=False, save_config_callback=None)
    timer = RoundTimer(window)
    strategy: Any = "auto" if window is None else PicardStrategy(window_size=window, threshold=0.0)
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator=setting.device,
            devices=1,
            strategy=strategy,
            max_steps=steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
            default_root_dir=root,
        )
        trainer.fit(cli.model, cli.datamodule)
    durations = timer.durations(warmup)
    if not durations:
        raise RuntimeError(f"{setting.name}: no timed round; raise --steps above window + warmup")
    return statistics.median(durations)


def time_denoiser(setting: Setting, window: int, repeats: int) -> tuple[float, float]:
    """Median seconds of the guidance call (CFG included) of one round: ``window`` calls on one step's noised
    latents against one call on ``window`` steps' latents, interleaved ``repeats`` times (robust to load drift)."""
    from recipes.cli import RecipeCLI
    from recipes.guidance.batching import concat_conditions

    cli = RecipeCLI(
        args=["-c", str(setting.config), *setting.overrides], run=False, save_config_callback=None
    )
    device = torch.device(setting.device)
    model = cli.model.to(device)
    sds = model.load_distiller(device).loss
    guidance = model.load_distiller(device).guidance
    dataset = cli.datamodule.train_dataloader().dataset
    samples, conditions, unconditions = [], [], []
    with torch.no_grad():
        for step in range(window):
            cameras = dataset[step].to(device)
            x = guidance.encode(model.scene.render(cameras)["comp_rgb"])
            condition, uncondition = guidance.conditions(cameras)
            samples.append(sds.noised(x, global_step=step))
            conditions.append(condition)
            unconditions.append(uncondition)
    batched_inputs = (
        torch.cat([sample.x_t for sample in samples]),
        torch.cat([sample.t for sample in samples]),
        concat_conditions(conditions),
        concat_conditions(unconditions),
    )

    def timed(call: Any) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def one_by_one() -> None:
        for sample, condition, uncondition in zip(samples, conditions, unconditions):
            sds.predict(sample.x_t, sample.t, condition, uncondition)

    separate, together = [], []
    timed(one_by_one), timed(lambda: sds.predict(*batched_inputs))  # warm-up
    for _ in range(repeats):
        separate.append(timed(one_by_one))
        together.append(timed(lambda: sds.predict(*batched_inputs)))
    return statistics.median(separate), statistics.median(together)


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--windows", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--configs", nargs="+", default=None, help="names of the configurations to run")
    parser.add_argument("--steps", type=int, default=None, help="steps per fit (default: 10 CPU, 12 GPU)")
    parser.add_argument("--warmup", type=int, default=2, help="rounds not timed at the start of each fit")
    parser.add_argument("--random-sd", type=Path, default=Path(tempfile.gettempdir()) / "random-sd21")
    parser.add_argument(
        "--override", action="append", default=[], help="a LightningCLI argument for every run"
    )
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    parser.add_argument(
        "--denoiser-only", action="store_true", help="time only the guidance call of a round (no fits)"
    )
    parser.add_argument("--repeats", type=int, default=20, help="interleaved repeats of --denoiser-only")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # the recipe CLI parses its own arguments

    settings = cpu_settings() if args.device == "cpu" else gpu_settings(args.random_sd)
    if args.list:
        for setting in settings:
            print(setting.name, setting.config.relative_to(ROOT), " ".join(setting.overrides))
        return
    if args.configs:
        settings = [s for s in settings if s.name in args.configs]
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    else:
        build_random_sd21(args.random_sd)
    steps = args.steps or (10 if args.device == "cpu" else 12)
    for setting in settings:
        setting.overrides += args.override
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(
        f"# batched slots, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {device_name}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads, torch {torch.__version__}, steps {steps}, "
        f"warmup {args.warmup}"
    )
    if args.denoiser_only:
        print("| config | P | P calls of one step (ms) | one call of P steps (ms) | gain | load |")
        print("|---|---|---|---|---|---|")
        calls = []
        for setting in settings:
            for window in args.windows:
                before = load()
                separate, together = time_denoiser(setting, window, args.repeats)
                calls.append(
                    {
                        "config": setting.name,
                        "P": window,
                        "separate_ms": separate * 1e3,
                        "together_ms": together * 1e3,
                        "gain": separate / together,
                        "load": before,
                    }
                )
                print(
                    f"| {setting.name} | {window} | {separate * 1e3:.2f} | {together * 1e3:.2f} | "
                    f"{separate / together:.2f}× | {before} |",
                    flush=True,
                )
        if args.json is not None:
            args.json.write_text(json.dumps(calls, indent=2) + "\n")
        return
    rows = []
    for setting in settings:
        before = load()
        t_seq = time_run(setting, None, False, steps, args.warmup)
        print(f"{setting.name}: sequential step {t_seq * 1e3:.1f} ms (load {before})", flush=True)
        for window in args.windows:
            figures: dict[str, list[float]] = {"one-by-one": [], "batched": []}
            loads = []
            for order in (("one-by-one", "batched"), ("batched", "one-by-one")):
                for mode in order:
                    loads.append(load())
                    figures[mode].append(time_run(setting, window, mode == "batched", steps, args.warmup))
                    print(
                        f"  P={window} {mode}: round {figures[mode][-1] * 1e3:.1f} ms (load {loads[-1]})",
                        flush=True,
                    )
            one, batched = statistics.mean(figures["one-by-one"]), statistics.mean(figures["batched"])
            row = {
                "config": setting.name,
                "P": window,
                "t_seq_ms": t_seq * 1e3,
                "one_by_one_ms": [t * 1e3 for t in figures["one-by-one"]],
                "batched_ms": [t * 1e3 for t in figures["batched"]],
                "gain": one / batched,
                "break_even_steps_per_round": batched / t_seq,
                "projected_speedup": {
                    f"{r:g}": r * t_seq / batched for r in (window / 2, 0.8 * window, window)
                },
                "load": loads,
            }
            rows.append(row)
    print()
    print(
        "| config | P | sequential step (ms) | round one by one (ms) | round batched (ms) | batched gain | "
        "break-even T/R | projected speedup at T/R = P/2, 0.8P, P | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        one = " / ".join(f"{t:.0f}" for t in row["one_by_one_ms"])
        batched = " / ".join(f"{t:.0f}" for t in row["batched_ms"])
        projected = ", ".join(f"{v:.2f}×" for v in row["projected_speedup"].values())
        print(
            f"| {row['config']} | {row['P']} | {row['t_seq_ms']:.0f} | {one} | {batched} | {row['gain']:.2f}× | "
            f"{row['break_even_steps_per_round']:.2f} | {projected} (projection) | {', '.join(row['load'])} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
