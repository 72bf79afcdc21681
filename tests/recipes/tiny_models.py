"""Test models for the guidance tests: an analytic denoiser, and tiny random diffusers/transformers models
built from config, saved to a temp folder in the real hub layouts and loaded back through the package's
own ``from_pretrained`` path (with ``HF_HUB_OFFLINE=1``).

Import the fixtures you need into a test module (``from tiny_models import tiny_sd_folder``); they are
module-scoped, so each tiny model is built once per test module. diffusers/transformers are imported
inside the builders so tests that only need the analytic denoiser stay fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class AffineDenoiser:
    """ε̂(x_t, t, c) = a·x_t + b·c (c = 0 when unconditional), on a linear-β schedule: every value hand-checkable."""

    def __init__(self, a: float = 0.5, b: float = 1.0, num_train_timesteps: int = 1000) -> None:
        self.a, self.b = a, b
        self.num_train_timesteps = num_train_timesteps
        betas = torch.linspace(1e-4, 0.02, num_train_timesteps)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.calls: list[tuple[torch.Tensor, Any]] = []

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, condition: Any) -> torch.Tensor:
        self.calls.append((t.clone(), condition))
        c = torch.zeros_like(x_t) if condition is None else condition
        return self.a * x_t + self.b * c


# ----------------------------------------------------------------------------------------------
# tiny Stable Diffusion (UNet, VAE, CLIP text encoder + tokenizer, scheduler) in the hub layout

SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
)


def _byte_level_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A lossless character-level CLIP vocabulary: GPT-2's 256 byte symbols, their ``</w>`` forms, 2 specials."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codepoints = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            codepoints.append(256 + extra)
            extra += 1
    symbols = [chr(c) for c in codepoints]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    merges = [("o", "f</w>")]
    vocab["of</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = _byte_level_clip_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)


def tiny_clip_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=16,
        projection_dim=32,
    )
    return CLIPTextModel(config)


def tiny_sd_unet(in_channels: int = 4, cross_attention_dim: int = 32):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=32,
    )


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=16,
        norm_num_groups=32,
    )


def save_tiny_stable_diffusion(folder: Path, prediction_type: str = "epsilon") -> Path:
    """Write a random tiny SD checkpoint in the hub layout (model_index.json + one subfolder per part)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer()
    pipeline = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_clip_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        unet=tiny_sd_unet(),
        scheduler=DDIMScheduler(**SD_SCHEDULER, prediction_type=prediction_type, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ε-prediction Stable Diffusion folder."""
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def tiny_sd_v_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny v-prediction Stable Diffusion folder (the role of stable-diffusion-2-1 in VSD)."""
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd-v"), prediction_type="v_prediction")


# ----------------------------------------------------------------------------------------------
# tiny DeepFloyd IF stage I (pixel UNet with 6 output channels, T5 encoder + Unigram tokenizer)


def tiny_t5_tokenizer():
    from transformers import T5Tokenizer

    words = [
        "a",
        "photo",
        "of",
        "the",
        "cat",
        "dog",
        "squirrel",
        "view",
        "front",
        "side",
        "back",
        "overhead",
        "blurry",
    ]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + w, -2.0) for w in words] + [("▁", -3.0)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz,.!?'-"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=77)


def tiny_t5_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config)


def tiny_if_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        in_channels=3,
        out_channels=6,
        cross_attention_dim=32,
        encoder_hid_dim=32,
        attention_head_dim=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
    )


def save_tiny_deepfloyd_if(folder: Path) -> Path:
    """Write a random tiny IF stage-I checkpoint in the hub layout."""
    from diffusers import DDPMScheduler, IFPipeline
    from diffusers.pipelines.deepfloyd_if import IFWatermarker

    torch.manual_seed(0)
    tokenizer = tiny_t5_tokenizer()
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.0,
        prediction_type="epsilon",
        variance_type="learned_range",
    )
    pipeline = IFPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_t5_encoder(len(tokenizer)),
        unet=tiny_if_unet(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        watermarker=IFWatermarker(),
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_if_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DeepFloyd IF stage-I folder."""
    return save_tiny_deepfloyd_if(tmp_path_factory.mktemp("tiny-if"))


# ----------------------------------------------------------------------------------------------
# tiny Zero-1-to-3 in the ashawkey/zero123-xl-diffusers folder layout


def save_tiny_zero123(folder: Path) -> Path:
    """Write a random tiny Zero123 checkpoint, one subfolder per part, plus model_index.json."""
    import json

    from diffusers import DDIMScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from recipes.guidance.zero123 import _camera_projection_class

    torch.manual_seed(0)
    embedding_dim = 32
    tiny_sd_unet(in_channels=8, cross_attention_dim=embedding_dim).save_pretrained(folder / "unet")
    tiny_vae().save_pretrained(folder / "vae")
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=32,
        patch_size=8,
        projection_dim=embedding_dim,
    )
    CLIPVisionModelWithProjection(vision).save_pretrained(folder / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "feature_extractor"
    )
    _camera_projection_class()(embedding_dim=embedding_dim).save_pretrained(folder / "clip_camera_projection")
    DDIMScheduler(**SD_SCHEDULER, set_alpha_to_one=False).save_pretrained(folder / "scheduler")
    model_index = {
        "_class_name": "Zero123Pipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "clip_camera_projection": ["zero123", "CLIPCameraProjection"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return folder


@pytest.fixture(scope="module")
def tiny_zero123_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Zero-1-to-3 folder in the diffusers layout DreamGaussian loads."""
    return save_tiny_zero123(tmp_path_factory.mktemp("tiny-zero123"))
