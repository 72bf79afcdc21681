"""Prompt-amortized text-to-3D (ScaleDreamer): one generator trained over a whole prompt corpus.

:class:`AmortizedTextTo3D` is :class:`~recipes.system.TextTo3D` with a corpus instead of one prompt and an
:class:`AmortizedScene` (a generator, e.g. Hyper-iNGP, rendered by NeuS) instead of one field. Each step:

1. draws ``B`` train prompts from the step seed (``B`` = the camera batch size: one view per prompt, as
   ScaleDreamer's Hyper-iNGP requires; :func:`~recipes.data.prompt_corpus.draw_prompts`), so every rank that
   evaluates the step draws the same ones;
2. keeps this rank's part, ``lightning_picard.batch_shard(trainer).slice(B)`` (the whole batch on one device or
   one rank per Picard slot; its share under plain DDP or a Picard slot group);
3. for each of its prompts, conditions the generator on the prompt's pooled text embedding, renders the field
   from that prompt's camera and distils the guidance into it (ASD by default; SDS, VSD, and CSD where it is
   installed), every random draw from a per-step stream of its own item ``j`` of the batch (so the split changes
   nothing);
4. returns the **mean** loss over its part (the group then averages the parts' gradients).

Validation renders the first ``n_val_prompts`` val prompts (one image per view, prompts side by side); test renders
a turntable of every test prompt into ``RUN/test/prompts/<i>-<prompt>/`` (a ``run.json`` with the prompt and
``test/turntable-step*.mp4``), so ``lightning-picard eval RUN/test/prompts/*`` scores each prompt (CLIP
R-Precision over the test prompts). ``export`` writes one mesh per test prompt.

The weight-free setting: ``corpus.procedural_objects: K`` makes the corpus the captions of K procedural objects
(:mod:`recipes.data.procedural_set`), the guidance their K view-conditioned closed-form priors in one denoiser
(:class:`~recipes.guidance.multi_object.MultiObjectPrior`, ``guidance.model: closed-form``) and the text encoder the
weight-free hash encoder (:class:`~recipes.guidance.corpus_embeddings.CaptionHashEncoder`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_picard import batch_shard, step_generator
from recipes.data.cameras import Cameras
from recipes.data.procedural_set import object_of_caption, procedural_objects
from recipes.data.prompt_corpus import PromptCorpus, draw_prompts, load_prompt_corpus
from recipes.export.mesh import export_mesh, marching_cubes
from recipes.export.video import image_grid, save_image, write_video
from recipes.geometry.amortized import AmortizedGenerator, ConditionedField, FieldSlot
from recipes.guidance.corpus_conditions import CorpusConditions, ObjectConditions, TextConditions
from recipes.guidance.corpus_embeddings import CaptionHashEncoder, PooledCLIPEncoder, corpus_embeddings
from recipes.guidance.lora import ParticleCondition
from recipes.guidance.prior_particle import ReferenceAdapter
from recipes.guidance.prompts import DEFAULT_CACHE_DIR, PromptConfig
from recipes.guidance.schedules import scalar_at
from recipes.guidance.sds import SDSConfig
from recipes.losses.regularizers import RegularizerWeights, regularization
from recipes.render.background import NeuralEnvironmentMapConfig, SolidColorConfig
from recipes.render.materials import DiffusePointLightConfig, NoMaterialConfig, albedo_activation
from recipes.render.neus import NeuSRenderer, NeuSRendererConfig
from recipes.render.occupancy import OccupancyGridConfig
from recipes.system.distillation import DistillationConfig, camera_condition
from recipes.system.guidance import Guidance, GuidanceConfig
from recipes.system.module import GUIDANCE_STREAM, PARTICLE_STREAM, RENDER_STREAM, TextTo3D
from recipes.system.nerf_scene import material_and_background
from recipes.system.optimizer import AdamSettings
from recipes.system.scene import Scene

PROMPT_STREAM, NOISE_STREAM, GENERATOR_STREAM = (
    4,
    5,
    6,
)  # beside TextTo3D's render (1), guidance (2), particle (3)
ITEM_STRIDE = 16  # item j of a step's batch draws from offsets ITEM_STRIDE·(j + 1) + stream


def item_stream(stream: int, item: int) -> int:
    """The step-generator offset of ``stream`` for item ``item`` of the step's batch."""
    return ITEM_STRIDE * (item + 1) + stream


def _default_renderer() -> NeuSRendererConfig:
    return NeuSRendererConfig(occupancy=OccupancyGridConfig(enabled=False))


@dataclass
class AmortizedOptimizer(AdamSettings):
    """Adam over the generator and the background (ScaleDreamer's amortized SD configs).

    Attributes:
        generator_lr: the generator (hash grid and hypernetwork, or the 3D-conv net). Default is 4e-3.
        background_lr: a learned background. Default is 1e-3.
        betas: Default is (0, 0.99), ScaleDreamer's.
        eps: Default is 1e-8, ScaleDreamer's.
    """

    generator_lr: float = 4e-3
    background_lr: float = 1e-3
    betas: tuple[float, float] = (0.0, 0.99)
    eps: float = 1e-8


class AmortizedScene(Scene):
    """A text-conditioned generator + material + background, each prompt's field rendered by NeuS.

    The renderer is NeuS (:class:`~recipes.render.neus.NeuSRenderer`) with the sharpness frozen at ``inv_std``
    (ScaleDreamer freezes its VolSDF variance at 30, "the most common variance across the prompts"; we keep the
    project's NeuS density rather than add VolSDF's, and freeze its sharpness the same way). No occupancy grid: it
    would describe one field, and every prompt has its own.

    Args:
        generator: the generator (``class_path: recipes.geometry.hyper_ingp.HyperINGP`` or another
            :class:`~recipes.geometry.amortized.AmortizedGenerator`).
        renderer: samples per ray, cosine annealing. Default is NeuS without occupancy grid.
        optimizer: learning rates. Default is ScaleDreamer's.
        inv_std: the frozen NeuS sharpness. Default is 30.
        material: ``"none"`` (unlit colour, ScaleDreamer's ``no-material``) or ``"diffuse"``. Default is ``"none"``.
        background: ``"solid"`` or ``"environment"`` (a prompt-independent learned map). Default is ``"solid"``.
        unlit, diffuse, solid, environment: their settings. Defaults are the parts' own.
    """

    def __init__(
        self,
        generator: nn.Module,
        renderer: NeuSRendererConfig | None = None,
        optimizer: AmortizedOptimizer | None = None,
        inv_std: float = 30.0,
        material: Literal["none", "diffuse"] = "none",
        background: Literal["solid", "environment"] = "solid",
        unlit: NoMaterialConfig | None = None,
        diffuse: DiffusePointLightConfig | None = None,
        solid: SolidColorConfig | None = None,
        environment: NeuralEnvironmentMapConfig | None = None,
    ) -> None:
        super().__init__()
        for name in ("embedding_dim", "noise_dim", "radius", "condition"):
            if not hasattr(generator, name):
                raise ValueError(
                    f"{type(generator).__name__} is not an amortized generator (no {name!r}); use a class that "
                    "implements recipes.geometry.amortized.AmortizedGenerator, e.g. recipes.geometry.hyper_ingp.HyperINGP"
                )
        renderer = renderer if renderer is not None else _default_renderer()
        if renderer.occupancy.enabled:
            raise ValueError(
                "an amortized scene renders a different field per prompt, so one occupancy grid cannot skip its "
                "empty space; set model.scene.renderer.occupancy.enabled false"
            )
        if inv_std <= 0:
            raise ValueError(f"inv_std must be positive, got {inv_std}")
        self.generator = generator
        shading, backdrop = material_and_background(material, diffuse, unlit, background, solid, environment)
        self.renderer = NeuSRenderer(FieldSlot(generator.radius), shading, backdrop, renderer)
        with torch.no_grad():
            self.renderer.variance.variance.fill_(math.log(inv_std) / 10.0)
        self.renderer.variance.variance.requires_grad_(False)
        self.optimizer_config = optimizer if optimizer is not None else AmortizedOptimizer()

    @property
    def amortized_generator(self) -> AmortizedGenerator:
        return self.generator  # type: ignore[return-value]

    def render_field(
        self, field: ConditionedField, cameras: Cameras, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Render one prompt's ``field`` from ``cameras``."""
        with self.renderer.geometry.holding(field):
            out = self.renderer(cameras, generator=generator)
        return {key: value for key, value in out.items() if torch.is_tensor(value)}

    def render(self, cameras: Cameras, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        raise ValueError(
            "an amortized scene renders a prompt's field: use AmortizedScene.render_field(generator.condition(...))"
        )

    def prepare_step(self, step: int) -> None:
        self.generator.update_step(step)
        self.renderer.anneal(step)
        for part in (self.renderer.material, self.renderer.background):
            if hasattr(part, "update_step"):
                part.update_step(step)

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        cfg = self.optimizer_config
        groups = {
            "generator": (self.generator.parameters(), cfg.generator_lr),
            "background": (self.renderer.background.parameters(), cfg.background_lr),
        }
        return cfg.build(groups), None

    def picard_buffers(self, prefix: str) -> dict[str, bool]:
        names = [f"{prefix}{name}" for name, _ in self.named_buffers() if name.endswith("band_mask")]
        return dict.fromkeys(names, False)  # set by prepare_step, a pure function of the step

    @torch.no_grad()
    def export_field_mesh(
        self, field: ConditionedField, stem: Path, resolution: int = 128, texture_size: int | None = 512
    ) -> list[Path]:
        """Write one prompt's zero level set as ``stem.obj`` (textured when ``texture_size`` is set) and ``.glb``."""
        device = next(self.generator.parameters()).device
        mesh = marching_cubes(lambda p: field.sdf(p.to(device)), resolution, field.radius, level=0.0)
        activation = getattr(self.renderer.material.config, "albedo_activation", "sigmoid")

        def color(points: Tensor) -> Tensor:
            return albedo_activation(activation, field(points.to(device)).features[..., :3])

        stem = Path(stem)
        return [
            export_mesh(stem.with_suffix(".obj"), mesh, color, texture_size=texture_size),
            export_mesh(stem.with_suffix(".glb"), mesh, color),
        ]

    def export_mesh(self, stem: Path, resolution: int = 128, texture_size: int | None = 512) -> list[Path]:
        raise ValueError(
            "an amortized scene has one mesh per prompt: export through AmortizedTextTo3D.export "
            "(lightning-picard export writes one per test prompt)"
        )


@dataclass
class CorpusConfig:
    """Which prompts an amortized run trains on (docs/recipes/amortized.md).

    Attributes:
        path: a JSON prompt library (``{"train": [...], "val": [...], "test": [...]}``) or a text file, one
            prompt a line (then all three splits). Default is None.
        procedural_objects: K, the weight-free corpus: the captions of the first K procedural objects, all three
            splits (for ``guidance.model: closed-form``, whose train prompts must be such captions). Default is None.
            Exactly one of ``path`` and ``procedural_objects``.
        cache_dir: the text-embedding cache folder. Default is ``.lightning_picard_cache/text_embeddings``.
    """

    path: str | None = None
    procedural_objects: int | None = None
    cache_dir: str = DEFAULT_CACHE_DIR

    def load(self) -> PromptCorpus:
        """The corpus (read and checked)."""
        if (self.path is None) == (self.procedural_objects is None):
            raise ValueError(
                "give the corpus as exactly one of model.corpus.path (a JSON prompt library or a text file) and "
                "model.corpus.procedural_objects (K, the weight-free captioned objects)"
            )
        if self.path is not None:
            return load_prompt_corpus(self.path)
        captions = [obj.caption for obj in procedural_objects(self.procedural_objects)]
        return PromptCorpus.from_prompts(captions, f"{self.procedural_objects} procedural objects")


@dataclass
class TextEncoderConfig:
    """The encoder of the pooled embedding the generator is conditioned on.

    Attributes:
        name: ``"caption-hash"`` (weight-free, :class:`~recipes.guidance.corpus_embeddings.CaptionHashEncoder`) or
            ``"clip"`` (a diffusers checkpoint's CLIP, ``pooler_output``). Default is ``"clip"``.
        pretrained_model_name_or_path: the checkpoint of ``"clip"``; None is the guidance's own (SD 2.1 base when
            the guidance is not a CLIP model). Default is None.
        embedding_dim: D (the generator's ``embedding_dim`` must match). Default is 1024.
        max_tokens: longer prompts are truncated, with a warning. Default is 77.
        batch_size: prompts per encoder call when the cache is filled. Default is 64.
    """

    name: Literal["caption-hash", "clip"] = "clip"
    pretrained_model_name_or_path: str | None = None
    embedding_dim: int = 1024
    max_tokens: int = 77
    batch_size: int = 64

    def build(self, guidance: GuidanceConfig) -> CaptionHashEncoder | PooledCLIPEncoder:
        if self.name == "caption-hash":
            return CaptionHashEncoder(self.embedding_dim, self.max_tokens)
        if self.name != "clip":
            raise ValueError(f"unknown text encoder {self.name!r}; use 'caption-hash' or 'clip'")
        path = self.pretrained_model_name_or_path
        if path is None and guidance.model == "stable-diffusion":
            path = guidance.model_config().pretrained_model_name_or_path
        kwargs = {"pretrained_model_name_or_path": path} if path is not None else {}
        return PooledCLIPEncoder(
            torch_dtype=guidance.torch_dtype,
            embedding_dim=self.embedding_dim,
            max_tokens=self.max_tokens,
            **kwargs,
        )


class AmortizedTextTo3D(TextTo3D):
    """Train one text-conditioned generator over a prompt corpus (see the module docstring).

    Args:
        scene: the generator and its renderer (``class_path: recipes.system.amortized.AmortizedScene``).
        corpus: the prompts (a file, or K procedural objects).
        text_encoder: the generator's pooled text embedding. Default is SD 2.1's CLIP.
        prompt: names the run folder (there is no single prompt). Default is ``"prompt corpus"``.
        recipe: the recipe's name. Default is ``"scaledreamer"``.
        n_val_prompts: val prompts rendered at each validation (None: all). Default is 4.
        guidance, prompt_options, sds, distillation, regularizers, seed, mesh_resolution, texture_size: as for
            :class:`~recipes.system.TextTo3D`; ``distillation.method`` defaults to ``"asd"`` here.
    """

    def __init__(
        self,
        scene: AmortizedScene,
        corpus: CorpusConfig,
        text_encoder: TextEncoderConfig | None = None,
        prompt: str = "prompt corpus",
        recipe: str = "scaledreamer",
        n_val_prompts: int | None = 4,
        guidance: GuidanceConfig | None = None,
        prompt_options: PromptConfig | None = None,
        sds: SDSConfig | None = None,
        distillation: DistillationConfig | None = None,
        regularizers: RegularizerWeights | None = None,
        seed: int = 0,
        mesh_resolution: int = 128,
        texture_size: int | None = 512,
    ) -> None:
        distillation = distillation if distillation is not None else DistillationConfig(method="asd")
        super().__init__(
            scene=scene,
            prompt=prompt,
            recipe=recipe,
            guidance=guidance,
            prompt_options=prompt_options,
            sds=sds,
            distillation=distillation,
            regularizers=regularizers,
            seed=seed,
            mesh_resolution=mesh_resolution,
            texture_size=texture_size,
        )
        self.scene: AmortizedScene
        self.corpus_config = corpus
        self.corpus = corpus.load()
        self.text_encoder_config = text_encoder if text_encoder is not None else TextEncoderConfig()
        self.n_val_prompts = n_val_prompts
        if self.guidance_config.model == "closed-form":
            for prompt in self.corpus.train:
                object_of_caption(prompt)  # raises with what to do
        if self.guidance_config.model == "zero123":
            raise ValueError("Zero-1-to-3 is image-conditioned; amortized text-to-3D needs a text model")
        generator_dim = scene.amortized_generator.embedding_dim
        if generator_dim != self.text_encoder_config.embedding_dim:
            raise ValueError(
                f"the generator takes {generator_dim}-d embeddings but the text encoder gives "
                f"{self.text_encoder_config.embedding_dim}-d ones; set both embedding_dim to the same value"
            )
        if self.distillation_config.method == "vsd" and self.guidance_config.model == "closed-form":
            height = self.guidance_config.closed_form.height
            references = len(self.corpus.train) * 36  # reference_cameras(): 12 azimuths × 3 elevations
            self.particle = ReferenceAdapter((references, 3, height, height))
        self._embeddings: dict[str, Tensor] = {}
        self._conditions: list[CorpusConditions] = []
        self._test_prompt_frames: list[list[Tensor]] = []

    # --- set-up ---------------------------------------------------------------------------------------------

    def text_embeddings(self) -> dict[str, Tensor]:
        """Each prompt's pooled embedding ``[D]`` (every split), from the cache or computed once."""
        if not self._embeddings:
            prompts = self.corpus.all_prompts()
            encoder = self.text_encoder_config.build(self.guidance_config)
            cached = corpus_embeddings(
                prompts, encoder, self.corpus_config.cache_dir, self.text_encoder_config.batch_size
            )
            if cached.computed:
                rank_zero_info(f"Computed {cached.computed} of {len(prompts)} prompt embeddings")
            self._embeddings = dict(zip(prompts, cached.embeddings))
        return self._embeddings

    def setup(self, stage: str) -> None:
        self.text_embeddings()
        super().setup(stage)

    def build_guidance(self, device: torch.device) -> Guidance:
        """The corpus's guidance: the K objects' priors (closed-form) or the text model with every prompt's
        view-dependent embeddings in the cache."""
        config = self.guidance_config
        if config.model == "closed-form":
            from recipes.guidance.multi_object import MultiObjectPrior

            objects = [object_of_caption(prompt).object for prompt in self.corpus.train]
            prior = MultiObjectPrior.from_objects(
                objects,
                config.closed_form.height,
                config.closed_form.sigma_deg,
                config.closed_form.restrict_deg,
            )
            self._conditions = [ObjectConditions()]
            return Guidance(config, prior.to(device), None)
        denoiser = config.model_class().from_pretrained(config.model_config(), device=device)
        self._conditions = [
            TextConditions(
                self.corpus.all_prompts(), self.prompt, denoiser.text_encoding(), device, denoiser.dtype
            )
        ]
        return Guidance(config, denoiser, None)

    @property
    def conditions(self) -> CorpusConditions:
        """The guidance's per-prompt conditions (loads the guidance on first use)."""
        self.load_distiller(self.device)
        return self._conditions[0]

    # --- training -------------------------------------------------------------------------------------------

    def training_step(self, cameras: Cameras, batch_idx: int) -> Tensor:
        step = self.global_step
        self.scene.prepare_step(step)
        batch = len(cameras)
        drawn = draw_prompts(len(self.corpus.train), batch, step_generator(offset=PROMPT_STREAM))
        part = range(batch)[batch_shard(self.trainer).slice(batch)]
        terms: dict[str, list[Tensor]] = {}
        losses = []
        for item in part:
            loss, logged = self.prompt_loss(int(drawn[item]), cameras[item], step, item)
            losses.append(loss)
            for name, value in logged.items():
                terms.setdefault(name, []).append(value)
        for name, values in terms.items():
            self.log(f"train/{name}", torch.stack(values).mean())
        return torch.stack(losses).mean()

    def prompt_loss(
        self, index: int, cameras: Cameras, step: int, item: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of train prompt ``index`` seen from ``cameras`` as item ``item`` of step ``step``'s batch, and
        its logged terms."""
        prompt = self.corpus.train[index]
        noise = self._noise(step_generator(offset=item_stream(NOISE_STREAM, item)))
        field = self.scene.amortized_generator.condition(
            self.text_embeddings()[prompt].to(self.device),
            noise,
            generator=step_generator(offset=item_stream(GENERATOR_STREAM, item)),
        )
        out = self.scene.render_field(
            field, cameras, generator=step_generator(offset=item_stream(RENDER_STREAM, item))
        )
        distiller = self.distiller
        generator = step_generator(offset=item_stream(GUIDANCE_STREAM, item))
        x = distiller.guidance.encode(out["comp_rgb"], generator)
        condition, uncondition = self.conditions.conditions(prompt, index, cameras)
        particle = ParticleCondition(self.conditions.view_independent(prompt), camera_condition(cameras))
        if self.distillation_config.method == "vsd":
            distilled = distiller.loss(
                x, condition, uncondition, particle, global_step=step, generator=generator
            )
        else:
            distilled = distiller.loss(x, condition, uncondition, global_step=step, generator=generator)
        loss = distilled.loss
        logged = {f"loss_{distiller.name}": loss.detach(), "t": distilled.t.float().mean()}
        if distiller.particle is not None:
            weight = scalar_at(self.distillation_config.particle.weight, step)
            particle_loss = weight * distiller.particle.lora_loss(
                x, particle, step_generator(offset=item_stream(PARTICLE_STREAM, item))
            )
            loss = loss + particle_loss
            logged["loss_particle"] = particle_loss.detach()
        for name, term in regularization(out, self.regularizers, step).items():
            loss = loss + term
            logged[name] = term.detach()
        return loss, logged

    def _noise(self, generator: torch.Generator) -> Tensor | None:
        dim = self.scene.amortized_generator.noise_dim
        if dim == 0:
            return None
        return torch.randn(dim, generator=generator).to(self.device)

    # --- outputs --------------------------------------------------------------------------------------------

    def eval_field(self, prompt: str, index: int) -> ConditionedField:
        """The field of ``prompt`` for rendering and export, with the fixed evaluation noise of its position."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        noise = self._noise(generator)
        embedding = self.text_embeddings()[prompt].to(self.device)
        return self.scene.amortized_generator.condition(embedding, noise, generator=generator)

    @torch.no_grad()
    def render_prompt(self, prompt: str, index: int, cameras: Cameras) -> Tensor:
        """RGB renders ``[B, H, W, 3]`` in [0, 1] of one prompt in evaluation mode."""
        was_training = self.training
        self.eval()
        try:
            field = self.eval_field(prompt, index)
            return self.scene.render_field(field, cameras.to(self.device))["comp_rgb"].clamp(0, 1)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def render_views(self, cameras: Cameras) -> Tensor:
        """The first (up to 8) test prompts side by side, ``[B, H, W·P, 3]`` (the dashboard's end-of-fit turntable)."""
        prompts = self.corpus.test[:8]
        return torch.cat([self.render_prompt(p, i, cameras) for i, p in enumerate(prompts)], dim=2)

    def _val_prompts(self) -> tuple[str, ...]:
        return self.corpus.val if self.n_val_prompts is None else self.corpus.val[: self.n_val_prompts]

    def validation_step(self, cameras: Cameras, batch_idx: int) -> None:
        renders = [self.render_prompt(p, i, cameras)[0] for i, p in enumerate(self._val_prompts())]
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            path = self.run_dir / "val" / f"step{self.global_step:06d}-view{batch_idx:02d}.png"
            save_image(path, image_grid(torch.stack(renders)))

    def on_test_epoch_start(self) -> None:
        self._test_prompt_frames = [[] for _ in self.corpus.test]

    def test_step(self, cameras: Cameras, batch_idx: int) -> None:
        for i, prompt in enumerate(self.corpus.test):
            self._test_prompt_frames[i].append(self.render_prompt(prompt, i, cameras).cpu())

    def on_test_epoch_end(self) -> None:
        if not self._test_prompt_frames or not self._test_prompt_frames[0] or not self.trainer.is_global_zero:
            return
        for i, prompt in enumerate(self.corpus.test):
            folder = self.prompt_dir(i)
            frames = torch.cat(self._test_prompt_frames[i])
            stem = folder / "test" / f"turntable-step{self._checkpoint_step:06d}"
            for suffix in (".mp4", ".gif"):
                write_video(stem.with_suffix(suffix), frames)
            save_image(stem.with_suffix(".png"), image_grid(frames[:: max(1, len(frames) // 8)][:8]))
            (folder / "run.json").write_text(
                json.dumps({"prompt": prompt, "recipe": self.recipe}, indent=2) + "\n"
            )
        rank_zero_info(
            f"Turntables of {len(self.corpus.test)} test prompts written to {self.run_dir / 'test' / 'prompts'}"
        )
        self._test_prompt_frames = []

    def prompt_dir(self, index: int) -> Path:
        """``RUN/test/prompts/<index>-<prompt>``: test prompt ``index``'s outputs, a run folder for ``eval``."""
        from recipes.cli import slug

        return self.run_dir / "test" / "prompts" / f"{index:03d}-{slug(self.corpus.test[index])}"

    def export(self, directory: Path | None = None) -> list[Path]:
        """One mesh per test prompt: ``directory/<index>-<prompt>.obj`` and ``.glb`` (default: RUN/export)."""
        from recipes.cli import slug

        directory = Path(directory) if directory is not None else self.run_dir / "export"
        paths: list[Path] = []
        for i, prompt in enumerate(self.corpus.test):
            stem = directory / f"{i:03d}-{slug(prompt)}"
            paths += self.scene.export_field_mesh(
                self.eval_field(prompt, i), stem, self.mesh_resolution, self.texture_size
            )
        return paths


__all__ = ["AmortizedOptimizer", "AmortizedScene", "AmortizedTextTo3D", "CorpusConfig", "TextEncoderConfig"]
