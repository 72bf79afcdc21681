"""Per-step guidance cost of each recipe at the paper's sizes, Picard's replay and all-gather at P = 8, and the
projected 8-GPU speedup (docs/DESIGN §3's model) beside DreamPropeller's reported figures. Projections, labelled so.

    python benchmarks/gpu_step_costs.py --out /tmp/gpu_costs                        # on a CUDA device: full size, fp16
    python benchmarks/gpu_step_costs.py --tiny --recipes dreamfusion-sd --state-size 10000   # CPU, tiny, for CI
    torchrun --nproc-per-node 8 benchmarks/gpu_step_costs.py                         # all-gather measured on 8 ranks
    python benchmarks/gpu_step_costs.py --speedup-csv /tmp/speedup/speedup.csv       # T/rounds from speedup.py

**What one step costs here** is the guidance's part of a score-distillation step, with randomly initialised networks
built from their configs (speed does not depend on the weights): Stable Diffusion 2.1 base's UNet (865 M parameters)
and VAE encoder, DeepFloyd IF-I-XL's UNet (an IF-I-XL-sized config: width 640·(1, 2, 3, 4), 3 residual blocks,
64-channel heads, T5-XXL's 4096-d text: 3.57 B parameters against the card's 4.3 B; the count is printed), Zero-1-to-3 XL's UNet (SD-1.x shape, 8
input channels); fp16 on CUDA, fp32 on CPU. Per recipe (``RECIPES``, batch sizes from the paper's configs,
shared/reference/dreampropeller.md §1.14): the UNet's forward without gradient on the classifier-free-guidance batch
(2B), plus, for latent models, the VAE encoder's forward and backward on the B renders at the model's resolution;
VSD adds the LoRA model's forward (B) and its training forward and backward (B, the same UNet: the LoRA's own
compute is small). **The renderer's cost is not included** (it needs the CUDA rasterizers and the scene at paper
size), so ``t_grad`` is a lower bound and the projection leans towards more overhead, not less.

**Picard's parts at P = 8**: ``D`` is the size of the recipe's Picard state, counted from its config
(``recipes/configs/<recipe>.yaml``, the initial state: Gaussians grow). The replay is P Adam steps on a flat
D-vector (fused on CUDA, foreach on CPU) with the per-step error norm and target copy; the all-gather moves P·D
float32 gradient rows: measured with ``torch.distributed`` when launched with a world size above 1 (each rank
gathers P / W rows), else **modelled** as a ring all-gather, (W − 1)/W · P·D·4 bytes over ``--link-gb-s`` (default
25 GB/s, PCIe 4.0 ×16, the paper's A100 PCIe machine: an assumption), printed as such.

**Projection** (DESIGN §3): with W = P = 8 ranks, one slot each, a round costs t_grad + t_gather + P·t_update; a
sequential step t_grad + t_update; speedup = S·(t_grad + t_update)/(t_grad + t_gather + P·t_update) at S = T/rounds
steps per round: S = P (the ceiling) and, given ``--speedup-csv``, S measured by benchmarks/speedup.py on the
closed-form prior (paper policy, P = 8).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SD21_BASE_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
)
"""stabilityai/stable-diffusion-2-1-base's unet/config.json (the fields that differ from diffusers' defaults)."""

SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=512,
)
"""Stable Diffusion's AutoencoderKL (SD 1.x and 2.x share it)."""

IF_I_XL_UNET = dict(
    sample_size=64,
    in_channels=3,
    out_channels=6,
    layers_per_block=3,
    block_out_channels=(640, 1280, 1920, 2560),
    down_block_types=(
        "ResnetDownsampleBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
    ),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=(
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "ResnetUpsampleBlock2D",
    ),
    attention_head_dim=64,
    cross_attention_dim=2560,
    encoder_hid_dim=4096,
    encoder_hid_dim_type="text_proj",
    addition_embed_type="text",
    addition_embed_type_num_heads=64,
    cross_attention_norm="group_norm",
    resnet_time_scale_shift="scale_shift",
    act_fn="gelu",
)
"""An IF-I-XL-sized stage-I UNet, reconstructed (IF's published config was not at hand): 3.57 B parameters against the
model card's 4.3 B, so its step time is an estimate of IF-I-XL's, likely a little low."""

ZERO123_UNET = {
    **SD21_BASE_UNET,
    "sample_size": 32,
    "in_channels": 8,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "use_linear_projection": False,
}
"""Zero-1-to-3 XL: an SD-1.x UNet whose input is the noisy latent and the input image's latent (8 channels)."""


@dataclass(frozen=True)
class Guidance:
    """A guidance network: UNet config, VAE config (None for pixel models), text tokens and width, resolution."""

    unet: dict[str, Any]
    vae: dict[str, Any] | None
    text_tokens: int
    text_dim: int
    image_resolution: int
    latent_channels: int


GUIDANCE = {
    "sd-2.1-base": Guidance(SD21_BASE_UNET, SD_VAE, 77, 1024, 512, 4),
    "if-i-xl": Guidance(IF_I_XL_UNET, None, 77, 4096, 64, 3),
    "zero123-xl": Guidance(ZERO123_UNET, SD_VAE, 1, 768, 256, 4),
}


def tiny(guidance: Guidance) -> Guidance:
    """The same architecture family at a size a CPU runs in a second (for CI and ``--tiny``)."""
    unet = dict(guidance.unet)
    blocks = len(unet["block_out_channels"])
    unet.update(block_out_channels=(32,) * blocks, layers_per_block=1, cross_attention_dim=32, sample_size=8)
    unet["attention_head_dim"] = 8
    if "encoder_hid_dim" in unet:
        unet.update(encoder_hid_dim=16, addition_embed_type_num_heads=2)
    else:
        unet["norm_num_groups"] = 8
    vae = None
    if guidance.vae is not None:
        vae = dict(
            guidance.vae, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=8, sample_size=32
        )
        vae.update(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text_dim = unet.get("encoder_hid_dim", 32)
    return Guidance(
        unet, vae, min(guidance.text_tokens, 4), text_dim, 16 if vae else 8, guidance.latent_channels
    )


@dataclass(frozen=True)
class Recipe:
    """A recipe at the paper's size: its guidance, batch B, distillation, config (for D), the paper's figures."""

    guidance: str
    batch: int
    config: str
    vsd: bool = False
    paper: str = "not in the reference notes"
    speedup_name: str | None = None
    config_overrides: tuple[str, ...] = ()


RECIPES = {
    "dreamfusion-if": Recipe(
        "if-i-xl", 16, "dreamfusion-if", paper="8080 s → 1910 s, 4.22× (Table 2)", speedup_name="dreamfusion"
    ),
    "dreamfusion-sd": Recipe("sd-2.1-base", 16, "dreamfusion-sd", speedup_name="dreamfusion"),
    "magic3d-coarse": Recipe("if-i-xl", 16, "magic3d-coarse", speedup_name="magic3d-coarse"),
    "magic3d-refine": Recipe("sd-2.1-base", 16, "magic3d-refine"),
    "textmesh": Recipe("if-i-xl", 16, "textmesh", speedup_name="textmesh"),
    "prolificdreamer-coarse": Recipe(
        "sd-2.1-base",
        8,
        "prolificdreamer-coarse",
        vsd=True,
        paper="9 h 28 min → 2 h 13 min, 4.27× (Figure 1)",
        speedup_name="prolificdreamer-coarse",
    ),
    "dreamgaussian": Recipe(
        "sd-2.1-base",
        16,
        "dreamgaussian",
        paper="11 min → 2 min, ≈5.5× (Figure 1, rounded)",
        speedup_name="dreamgaussian",
    ),
    "zero123": Recipe(
        "zero123-xl",
        16,
        "zero123-nerf",
        speedup_name="zero123-nerf",
        config_overrides=("--data.image=procedural",),
    ),
}
"""Batch sizes: DreamPropeller's configs (16; ProlificDreamer's first phase 8). The paper's reported wall-clock
figures known to shared/reference/dreampropeller.md; the range of its Table 2 is 4.22–4.69× on 8 A100s (P = 7)."""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` calls after one warm-up call."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_guidance(guidance: Guidance, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """Random-weight UNet (and VAE) from config, frozen, on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 3.6 B UNet takes minutes to initialise on a CPU
        unet = UNet2DConditionModel(**guidance.unet).to(dtype).eval().requires_grad_(False)
        vae = None
        if guidance.vae is not None:
            vae = AutoencoderKL(**guidance.vae).to(dtype).eval().requires_grad_(False)
    return unet, vae


def parameter_count(config: dict[str, Any]) -> int:
    """Parameters of a UNet config, counted on the meta device (nothing allocated)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return sum(p.numel() for p in UNet2DConditionModel(**config).parameters())


def guidance_step(
    guidance: Guidance, unet: Any, vae: Any, batch: int, vsd: bool, device: torch.device, dtype: torch.dtype
) -> Callable[[], None]:
    """One step's guidance work: VAE encoder forward+backward (latent models), UNet on the CFG batch without
    gradient, and for VSD the LoRA model's forward and training forward+backward."""
    in_channels = guidance.unet["in_channels"]
    text = torch.randn(2 * batch, guidance.text_tokens, guidance.text_dim, device=device, dtype=dtype)
    timesteps = torch.randint(20, 980, (2 * batch,), device=device)
    render = torch.rand(batch, 3, 64, 64, device=device, dtype=dtype, requires_grad=True)

    def step() -> None:
        pixels = F.interpolate(render, (guidance.image_resolution,) * 2, mode="bilinear") * 2 - 1
        if vae is not None:
            latents = vae.encode(pixels).latent_dist.sample()
        else:
            latents = pixels
        model_input = latents.detach()
        if (
            in_channels != guidance.latent_channels
        ):  # Zero-1-to-3: the input image's latent beside the noisy one
            model_input = torch.cat([model_input, torch.zeros_like(model_input)], dim=1)
        with torch.no_grad():
            noise_pred = unet(model_input.repeat(2, 1, 1, 1), timesteps, encoder_hidden_states=text).sample
            if vsd:
                _ = unet(model_input, timesteps[:batch], encoder_hidden_states=text[:batch]).sample
        if vsd:
            trained = model_input.clone().requires_grad_(True)
            out = unet(trained, timesteps[:batch], encoder_hidden_states=text[:batch]).sample
            out.float().square().mean().backward()
        target = noise_pred[:batch, : latents.shape[1]].float()
        if target.shape[-1] != latents.shape[-1]:
            target = F.interpolate(target, latents.shape[-2:])
        (latents.float() * target).sum().backward()
        render.grad = None

    return step


def replay_seconds(state_size: int, window: int, device: torch.device, repeat: int) -> float:
    """P Adam steps on a flat D-vector with the per-step error norm and target copy (one replay of a round)."""
    parameter = torch.nn.Parameter(torch.randn(state_size, device=device))
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.Adam([parameter], lr=1e-3, **fused)
    gradients = torch.randn(window, state_size, device=device)
    targets = torch.randn(window, state_size, device=device)
    errors = torch.empty(window, device=device)

    def replay() -> None:
        for j in range(window):
            parameter.grad = gradients[j]
            optimizer.step()
            errors[j] = (parameter.detach() - targets[j]).square().sum()
            targets[j].copy_(parameter.detach())
        errors.tolist()  # the round's one host read

    return timed(replay, device, repeat)


def gather_seconds(state_size: int, window: int, device: torch.device, repeat: int) -> tuple[float, str]:
    """The all-gather of P gradient rows of D floats: measured across the launched ranks, else modelled."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        rows = -(-window // world)
        local = torch.randn(rows * state_size, device=device)
        gathered = torch.empty(world * rows * state_size, device=device)

        def gather() -> None:
            dist.all_gather_into_tensor(gathered, local)

        dist.barrier()
        return timed(gather, device, repeat), f"measured, {world} ranks ({dist.get_backend()})"
    return math.nan, "modelled"


def copy_bandwidth(device: torch.device, megabytes: int = 256) -> float:
    """Measured on-device copy bandwidth in GB/s (read + write), for reference beside the modelled link."""
    source = torch.empty(megabytes * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    seconds = timed(lambda: target.copy_(source), device, 5)
    return 2 * source.numel() * 4 / seconds / 1e9


def state_size_of(recipe: Recipe) -> int:
    """Picard-state size of the recipe's config (the initial state), built on CPU without guidance."""
    from lightning_picard.hooks import picard_parameters
    from recipes.cli import RecipeCLI

    args = ["-c", str(Path(__file__).resolve().parents[1] / "recipes" / "configs" / f"{recipe.config}.yaml")]
    model = RecipeCLI(args=[*args, *recipe.config_overrides], run=False, save_config_callback=None).model
    return sum(p.numel() for p in picard_parameters(model))


def measured_steps_per_round(path: Path | None) -> dict[str, float]:
    """T/rounds at P = 8 with the paper's policy, base setting, per speedup.py recipe name."""
    if path is None:
        return {}
    with path.open() as file:
        return {
            r["recipe"]: float(r["T/rounds"])
            for r in csv.DictReader(file)
            if r["policy"] == "paper" and r["setting"] == "base" and int(r["P"]) == 8
        }


def projected_speedup(
    t_grad: float, t_update: float, t_gather: float, window: int, steps_per_round: float
) -> float:
    """DESIGN §3 with one slot per rank (W = P): S·(t_grad + t_update) / (t_grad + t_gather + P·t_update)."""
    return steps_per_round * (t_grad + t_update) / (t_grad + t_gather + window * t_update)


COLUMNS = (
    "recipe",
    "guidance",
    "unet_params",
    "batch",
    "t_grad_ms",
    "D",
    "replay_ms_P8",
    "t_update_ms",
    "gather_ms_P8",
    "gather_source",
    "projected_speedup_at_S=P",
    "S_measured_cpu",
    "projected_speedup_at_S_measured",
    "paper",
)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--window", type=int, default=8, help="P = W. Default is 8.")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny networks, batch 1 (the default without CUDA)"
    )
    parser.add_argument(
        "--state-size", type=int, default=None, help="D for every recipe instead of its config's"
    )
    parser.add_argument(
        "--link-gb-s", type=float, default=25.0, help="modelled all-gather link. Default is 25 GB/s."
    )
    parser.add_argument(
        "--repeat", type=int, default=5, help="timed calls per figure (median). Default is 5."
    )
    parser.add_argument(
        "--speedup-csv", type=Path, default=None, help="speedup.py's CSV, for measured T/rounds"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_step_costs"))
    args = parser.parse_args(argv)

    if torch.cuda.is_available():  # the rank's device first, so that NCCL binds to it
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    small = args.tiny or device.type == "cpu"
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    header = (
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, device {device} ({name}), {dtype}, "
        f"{'TINY networks, batch 1 (not the paper size)' if small else 'paper-size networks'}, torch {torch.__version__}"
    )
    print(header, flush=True)
    bandwidth = copy_bandwidth(device, 16 if small else 256)
    print(
        f"on-device copy bandwidth (measured): {bandwidth:.1f} GB/s; all-gather link (modelled): {args.link_gb_s} GB/s"
    )
    measured_s = measured_steps_per_round(args.speedup_csv)
    rows = []
    built: dict[str, tuple[Any, Any]] = {}
    for recipe_name in args.recipes:
        recipe = RECIPES[recipe_name]
        guidance = tiny(GUIDANCE[recipe.guidance]) if small else GUIDANCE[recipe.guidance]
        batch = 1 if small else recipe.batch
        if recipe.guidance not in built:  # recipes that share a guidance network time the same one
            built[recipe.guidance] = build_guidance(guidance, device, dtype)
        unet, vae = built[recipe.guidance]
        t_grad = timed(
            guidance_step(guidance, unet, vae, batch, recipe.vsd, device, dtype), device, args.repeat
        )
        state_size = args.state_size or state_size_of(recipe)
        replay = replay_seconds(state_size, args.window, device, args.repeat)
        gather, source = gather_seconds(state_size, args.window, device, args.repeat)
        if math.isnan(gather):
            world = args.window
            gather = (world - 1) / world * args.window * state_size * 4 / (args.link_gb_s * 1e9)
            source = f"modelled: ring, {args.link_gb_s:g} GB/s"
        t_update = replay / args.window
        s_measured = measured_s.get(recipe.speedup_name or "", math.nan)
        row = {
            "recipe": recipe_name,
            "guidance": recipe.guidance + (" (tiny)" if small else ""),
            "unet_params": parameter_count(guidance.unet),
            "batch": batch,
            "t_grad_ms": 1e3 * t_grad,
            "D": state_size,
            "replay_ms_P8": 1e3 * replay,
            "t_update_ms": 1e3 * t_update,
            "gather_ms_P8": 1e3 * gather,
            "gather_source": source,
            "projected_speedup_at_S=P": projected_speedup(t_grad, t_update, gather, args.window, args.window),
            "S_measured_cpu": s_measured,
            "projected_speedup_at_S_measured": projected_speedup(
                t_grad, t_update, gather, args.window, s_measured
            ),
            "paper": recipe.paper,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if distributed and torch.distributed.get_rank() != 0:
        return rows
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "gpu_step_costs.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [
            f"{v:,.2f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)
            for v in r.values()
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Projected speedups are projections (DESIGN §3 model), not measurements of a Picard run.")
    (args.out / "gpu_step_costs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
