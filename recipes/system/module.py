"""The one LightningModule every text-to-3D recipe runs: scene + guidance + score distillation + outputs.

A recipe is a YAML config that composes a :class:`~recipes.system.scene.Scene` (3D Gaussians, a NeRF, …), a
:class:`~recipes.system.guidance.GuidanceConfig`, the score distillation (SDS, ASD or VSD:
:mod:`recipes.system.distillation`) and the step schedules. The module is
Picard-ready by construction (docs/picard-ready-module.md): every random choice of step ``s`` comes from the
per-step seed, work between optimizer steps happens in ``picard_after_optimizer_step``, and the same module
runs sequentially (it adds :class:`lightning_picard.StepSeed` itself when the strategy is not Picard).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_picard import PicardSlot, PicardStrategy, StepSeed, step_generator
from lightning_picard.progress import picard_progress_bar
from recipes.data.cameras import Cameras
from recipes.export.video import image_grid, save_image, write_video
from recipes.guidance.batching import concat_conditions
from recipes.guidance.prompts import PromptConfig
from recipes.guidance.sds import SDSConfig
from recipes.losses.regularizers import RegularizerWeights, regularization
from recipes.system.distillation import DistillationConfig, Distiller, LoRAParameters, particle_module
from recipes.system.guidance import Guidance, GuidanceConfig, prompt_config
from recipes.system.scene import Scene

SCENE_PREFIX = "scene."
RENDER_STREAM, GUIDANCE_STREAM, PARTICLE_STREAM = 1, 2, 3  # offsets of the step's independent random streams
PARTICLE_PREFIX = "particle."


class TextTo3D(pl.LightningModule):
    """Distil a diffusion model's score into a 3D scene, one optimizer step per camera batch.

    Batches are :class:`~recipes.data.cameras.Cameras` (``recipes.data.random_cameras.RandomCameraDataModule``):
    step ``s`` always gets the same cameras, on any rank.

    Args:
        scene: the representation (``class_path: recipes.system.GaussianScene`` or ``NeRFScene``).
        prompt: what to generate. Must not be empty.
        recipe: the recipe's name: names the run folder and is checked when a checkpoint is exported or
            tested. Default is ``"text-to-3d"``.
        guidance: the diffusion model. Default is Stable Diffusion 2.1 base.
        prompt_options: view-dependent prompting, negative prompt, embedding cache; its ``prompt`` field is
            replaced by ``prompt``. Default is threestudio's view-dependent prompting.
        sds: Score Distillation Sampling settings (CFG scale, timestep schedule, weighting), used when
            ``distillation.method`` is ``sds``. Default is SDS's.
        distillation: the score distillation (``method: sds | asd | vsd`` and the ASD/VSD settings, VSD's
            particle score and its placement under Picard). Default is SDS.
        regularizers: weights (numbers or step schedules) of the render regularizers (orientation, sparsity,
            opaque, z-variance, eikonal, …; docs/recipes/regularizers.md). Default is none.
        seed: base of the per-step seeds of a sequential run; under Picard it must equal the strategy's seed.
            Default is 0.
        mesh_resolution: marching-cubes grid size for mesh export. Default is 128.
        texture_size: baked texture size for the ``.obj`` export (None: vertex colours). Default is 512.
        init_from: an earlier stage's run folder (or checkpoint) to start the scene from, once, before the first
            step of a fresh fit (:meth:`Scene.init_from`; Magic3D's refine starts from its coarse run). Default is
            None (the scene's own initialisation).
        batched_slots: under Picard with several slots per rank (``window_size`` above the number of ranks),
            evaluate a rank's slots as one batch (:meth:`picard_training_step_slots`): each slot renders from its
            own guess with its own step seed, and the denoiser runs once over every slot's latents. SDS only.
            Equal to the one-by-one evaluation to float tolerance (not bit for bit: the batched denoiser call
            rounds differently). Default is False.
    """

    def __init__(
        self,
        scene: Scene,
        prompt: str,
        recipe: str = "text-to-3d",
        guidance: GuidanceConfig | None = None,
        prompt_options: PromptConfig | None = None,
        sds: SDSConfig | None = None,
        distillation: DistillationConfig | None = None,
        regularizers: RegularizerWeights | None = None,
        seed: int = 0,
        mesh_resolution: int = 128,
        texture_size: int | None = 512,
        init_from: str | None = None,
        batched_slots: bool = False,
    ) -> None:
        super().__init__()
        self.prompt = prompt_config(prompt, prompt_options)
        self.scene = scene
        self.recipe = recipe
        self.guidance_config = guidance if guidance is not None else GuidanceConfig()
        self.sds_config = sds if sds is not None else SDSConfig()
        self.distillation_config = distillation if distillation is not None else DistillationConfig()
        self.distillation_config.check_guidance(self.guidance_config)
        self.batched_slots = batched_slots
        if batched_slots and self.distillation_config.method != "sds":
            raise ValueError(
                f"model.batched_slots batches SDS's denoiser call, not {self.distillation_config.method}'s; set "
                "model.batched_slots false (the slots are then evaluated one by one), or use "
                "model.distillation.method sds"
            )
        if batched_slots and type(self).training_step is not TextTo3D.training_step:
            raise ValueError(
                f"model.batched_slots batches TextTo3D's training step, which {type(self).__name__} replaces; set "
                "model.batched_slots false"
            )
        if not batched_slots:
            self.picard_training_step_slots = None  # the loop evaluates slots one by one
        self.particle: torch.nn.Module | None = particle_module(
            self.distillation_config, self.guidance_config
        )
        self._pending_particle_state: dict[str, Tensor] = {}
        self._particle_optimizer: torch.optim.Optimizer | None = None
        self._pending_particle_optimizer: dict[str, Any] | None = None
        self.regularizers = regularizers if regularizers is not None else RegularizerWeights()
        self.seed = seed
        self.mesh_resolution = mesh_resolution
        self.texture_size = texture_size
        self.init_from = init_from
        self._started_from: str | None = None
        self._guidance: dict[str, Any] = {}  # a plain dict: the models are never submodules
        self._test_frames: list[Tensor] = []
        self._train_started = time.perf_counter()
        self._checkpoint_step = 0  # the step of the loaded checkpoint (test does not restore global_step)

    # --- set-up ---------------------------------------------------------------------------------------------

    def check_data(self, datamodule: pl.LightningDataModule | None) -> None:
        """Raise ``ValueError`` if the training cameras' resolution suits neither the scene nor the guidance."""
        config = getattr(datamodule, "config", None)
        if config is None or not hasattr(config, "resolution_at"):
            return
        milestones = [0, *getattr(config, "resolution_milestones", [])]
        required = self.guidance_config.required_resolution()
        for step in milestones:
            height, width = config.resolution_at(step)
            self.scene.check_resolution(height, width)
            if required is not None and (height, width) != required:
                raise ValueError(
                    f"the {self.guidance_config.model} guidance needs {required[0]}x{required[1]} renders but "
                    f"the cameras render {height}x{width} from step {step}; set data.cameras.height/width to "
                    f"{required[0]} or guidance.closed_form.height to {height}"
                )

    def start_from_previous_stage(self) -> None:
        """Initialise the scene from ``init_from`` (once; nothing when it is None)."""
        if self.init_from is not None and self._started_from != self.init_from:
            from recipes.system.handover import start_from_stage

            start_from_stage(self.scene, self.init_from)
            self._started_from = self.init_from

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.check_data(getattr(self.trainer, "datamodule", None))
            if self.trainer.ckpt_path is None:  # a resumed fit restores its own state
                self.start_from_previous_stage()
            # VSD's particle trainables must exist (and a fresh fit's particle be started) before the optimizers
            # and the Picard state are set up
            if self.distillation_config.method == "vsd":
                distiller = self.load_distiller(self.trainer.strategy.root_device)
                if self.trainer.ckpt_path is None:  # a resumed fit restores its particle
                    distiller.start_particle(self._render_first_step)

    def configure_callbacks(self) -> list[pl.Callback]:
        """:class:`~lightning_picard.StepSeed` in sequential runs, and a bar that counts steps (and rounds)."""
        bar = picard_progress_bar(self.trainer)
        callbacks: list[pl.Callback] = [] if bar is None else [bar]
        strategy = self.trainer.strategy
        if isinstance(strategy, PicardStrategy):
            if strategy.seed != self.seed:
                raise ValueError(
                    f"model.seed={self.seed} but the Picard strategy's seed is {strategy.seed}: they are the same "
                    "per-step seed. Set both, e.g. --model.seed 3 --trainer.strategy.seed 3 "
                    "(strategy given as class_path: lightning_picard.PicardStrategy)."
                )
            return callbacks
        return [*callbacks, StepSeed(self.seed)]

    @property
    def guidance(self) -> Guidance:
        """The loaded guidance (loaded on first use, on this module's device)."""
        return self.load_distiller(self.device).guidance

    @property
    def distiller(self) -> Distiller:
        """The configured score distillation on the loaded guidance (loaded on first use)."""
        return self.load_distiller(self.device)

    def load_distiller(self, device: torch.device) -> Distiller:
        """Load the guidance (and VSD's LoRA, registered as :attr:`particle`) onto ``device`` once."""
        if "distiller" not in self._guidance:
            rank_zero_info(
                f"Loading guidance: {self.guidance_config.model} ({self.distillation_config.method})"
            )
            guidance = self.build_guidance(device)
            distiller = Distiller.build(
                self.distillation_config, self.sds_config, guidance, self.particle, device
            )
            if self.particle is None and distiller.particle is not None:
                self.particle = LoRAParameters(distiller.particle)
                if self._pending_particle_state:
                    self.particle.load_state_dict(self._pending_particle_state)
                    self._pending_particle_state = {}
            self._guidance["distiller"] = distiller
        return self._guidance["distiller"]

    def build_guidance(self, device: torch.device) -> Guidance:
        """The guidance model on ``device`` with the prompt's embeddings (a subclass conditions it otherwise)."""
        return Guidance.load(self.guidance_config, self.prompt, device)

    def on_fit_start(self) -> None:
        distiller = self.distiller  # load before the first step, not inside a timed slot
        if self._particle_placement() == "rank_local":
            self._particle_optimizer = distiller.particle_optimizer()
            if self._pending_particle_optimizer is not None:
                self._particle_optimizer.load_state_dict(self._pending_particle_optimizer)
                self._pending_particle_optimizer = None

    def _render_first_step(self, cameras: Cameras) -> Tensor:
        """The scene as step 0 sees it, rendered from ``cameras`` in evaluation mode."""
        self.scene.prepare_step(0)
        return self.render_views(cameras)

    def _particle_placement(self) -> str | None:
        if self.distillation_config.method != "vsd":
            return None
        return self.distillation_config.particle.placement

    def picard_local_parameters(self) -> list[torch.nn.Parameter]:
        """VSD's particle trainables when they are rank-local (the paper's choice); else none."""
        if self._particle_placement() != "rank_local" or self.particle is None:
            return []
        return list(self.particle.parameters())

    def on_after_backward(self) -> None:
        """Step the rank-local particle right after each gradient evaluation (each Picard slot, or each step)."""
        if self._particle_optimizer is None or not self.training:
            return
        self._particle_optimizer.step()
        self._particle_optimizer.zero_grad(set_to_none=True)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """As ``nn.Module``'s; a LoRA particle's tensors wait until the LoRA is loaded (test and export need none)."""
        if self.particle is None:
            particle = {k: v for k, v in state_dict.items() if k.startswith(PARTICLE_PREFIX)}
            if particle:
                self._pending_particle_state = {k[len(PARTICLE_PREFIX) :]: v for k, v in particle.items()}
                state_dict = {k: v for k, v in state_dict.items() if not k.startswith(PARTICLE_PREFIX)}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_train_start(self) -> None:
        self._train_started = time.perf_counter()

    def on_train_end(self) -> None:
        """Write ``run.json`` (steps, rounds, fit seconds, strategy) into the run folder."""
        if not self.trainer.is_global_zero:
            return
        rounds = self.trainer.callback_metrics.get("picard/rounds")
        info = {
            "recipe": self.recipe,
            "prompt": self.prompt.prompt,
            "steps": int(self.trainer.global_step),
            "rounds": int(rounds.item()) if rounds is not None else int(self.trainer.global_step),
            "fit_seconds": time.perf_counter() - self._train_started,
            "strategy": type(self.trainer.strategy).__name__,
            "world_size": self.trainer.world_size,
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")

    def configure_optimizers(self) -> Any:
        optimizer, scheduler = self.scene.configure_optimizers()
        if self._particle_placement() == "replayed":
            group = self.distiller.particle_param_group()
            if not isinstance(optimizer, torch.optim.AdamW):
                raise ValueError(
                    "particle.placement 'replayed' trains the particle in the scene's optimizer, which must be AdamW "
                    "(ProlificDreamer's); set model.scene.optimizer.name adamw, or use placement rank_local"
                )
            optimizer.add_param_group(group)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- training -------------------------------------------------------------------------------------------

    def training_step(self, cameras: Cameras, batch_idx: int) -> Tensor:
        step = self.global_step
        self.scene.prepare_step(step)
        out = self.scene.render(cameras, generator=step_generator(offset=RENDER_STREAM))
        generator = step_generator(offset=GUIDANCE_STREAM)
        distiller = self.distiller
        x = distiller.guidance.encode(out["comp_rgb"], generator)
        distilled = distiller(x, cameras, step, generator)
        loss = distilled.loss
        self.log(f"train/loss_{distiller.name}", loss.detach())
        self.log("train/t", distilled.t.float().mean())
        particle_loss = distiller.particle_loss(x, cameras, step, step_generator(offset=PARTICLE_STREAM))
        if particle_loss is not None:
            loss = loss + particle_loss
            self.log("train/loss_particle", particle_loss.detach())
        return self._add_regularizers(loss, out, step)

    def _add_regularizers(self, loss: Tensor, out: dict[str, Tensor], step: int) -> Tensor:
        for name, term in regularization(out, self.regularizers, step).items():
            loss = loss + term
            self.log(f"train/{name}", term.detach())
        return loss

    def picard_training_step_slots(self, slots: list[PicardSlot]) -> list[Tensor]:
        """:meth:`training_step` of several Picard slots at once (``model.batched_slots``, SDS).

        Each slot renders from its own guess and draws its camera shading, timestep and noise from its own step's
        generators, exactly as its ``training_step`` would; the denoiser then runs once over all the slots' noised
        latents, and each slot's SDS loss and regularizers are its own.
        """
        distiller = self.distiller
        sds = distiller.loss
        renders, samples, conditions, unconditions = [], [], [], []
        for slot in slots:
            with slot:
                step, cameras = self.global_step, slot.batch
                self.scene.prepare_step(step)
                out = self.scene.render(cameras, generator=step_generator(offset=RENDER_STREAM))
                generator = step_generator(offset=GUIDANCE_STREAM)
                x = distiller.guidance.encode(out["comp_rgb"], generator)
                condition, uncondition = distiller.guidance.conditions(cameras)
                samples.append(sds.noised(x, global_step=step, generator=generator))
            renders.append(out)
            conditions.append(condition)
            unconditions.append(uncondition)
        eps_hat = sds.predict(
            torch.cat([sample.x_t for sample in samples]),
            torch.cat([sample.t for sample in samples]),
            concat_conditions(conditions),
            concat_conditions(unconditions),
        )
        losses = []
        for slot, out, sample, eps in zip(
            slots, renders, samples, eps_hat.split([len(s.x_t) for s in samples])
        ):
            with slot:
                distilled = sds.distill(sample, eps, global_step=slot.step)
                loss = distilled.loss
                self.log(f"train/loss_{distiller.name}", loss.detach())
                self.log("train/t", distilled.t.float().mean())
                losses.append(self._add_regularizers(loss, out, slot.step))
        return losses

    # --- Picard protocol (delegated to the scene, which owns the state) ------------------------------------

    def picard_buffers(self) -> dict[str, bool]:
        return self.scene.picard_buffers(SCENE_PREFIX)

    def picard_step_outputs(self) -> list[str]:
        return self.scene.picard_step_outputs(SCENE_PREFIX)

    def picard_after_optimizer_step(self, step: int) -> dict[str, Tensor] | None:
        return self.scene.after_optimizer_step(step, self.optimizers(use_pl_optimizer=False), SCENE_PREFIX)

    # --- outputs --------------------------------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        """Where images, videos and meshes go: the Trainer's ``default_root_dir`` (the run folder)."""
        return Path(self.trainer.default_root_dir)

    @torch.no_grad()
    def render_views(self, cameras: Cameras) -> Tensor:
        """RGB renders ``[B, H, W, 3]`` in [0, 1] in evaluation mode (no random shading)."""
        was_training = self.training
        self.eval()
        try:
            return self.scene.render(cameras.to(self.device))["comp_rgb"].clamp(0, 1)
        finally:
            self.train(was_training)

    def validation_step(self, cameras: Cameras, batch_idx: int) -> None:
        rgb = self.render_views(cameras)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            path = self.run_dir / "val" / f"step{self.global_step:06d}-view{batch_idx:02d}.png"
            save_image(path, image_grid(rgb))

    def test_step(self, cameras: Cameras, batch_idx: int) -> None:
        self._test_frames.append(self.render_views(cameras).cpu())

    def on_test_epoch_start(self) -> None:
        self._test_frames = []

    def on_test_epoch_end(self) -> None:
        if not self._test_frames or not self.trainer.is_global_zero:
            return
        frames = torch.cat(self._test_frames)
        stem = self.run_dir / "test" / f"turntable-step{self._checkpoint_step:06d}"
        for suffix in (".mp4", ".gif"):
            write_video(stem.with_suffix(suffix), frames)
        save_image(stem.with_suffix(".png"), image_grid(frames[:: max(1, len(frames) // 8)][:8]))
        rank_zero_info(f"Turntable written to {stem}.mp4 and .gif")
        self._test_frames = []

    def export(self, directory: Path | None = None) -> list[Path]:
        """Write the mesh (``.obj`` with baked texture, ``.glb``) into ``directory`` (default: RUN/export)."""
        directory = Path(directory) if directory is not None else self.run_dir / "export"
        return self.scene.export_mesh(directory / "mesh", self.mesh_resolution, self.texture_size)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._checkpoint_step = int(checkpoint.get("global_step", 0))
        self._pending_particle_optimizer = checkpoint.get("particle_optimizer")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["recipe"] = {"name": self.recipe, "scene": type(self.scene).__name__}
        if self._particle_optimizer is not None:
            # The rank-local particle's optimizer is the module's own (Lightning checkpoints only its optimizers);
            # under Picard this is rank 0's, as the particle's weights in the state dict are.
            checkpoint["particle_optimizer"] = self._particle_optimizer.state_dict()

    def check_checkpoint(self, checkpoint: dict[str, Any], path: str | Path) -> None:
        """Raise ``ValueError`` if ``checkpoint`` was written by another recipe or representation."""
        saved = checkpoint.get("recipe")
        ours = {"name": self.recipe, "scene": type(self.scene).__name__}
        if saved is None:
            raise ValueError(f"{path} is not a checkpoint of a lightning-picard recipe (no 'recipe' entry)")
        if saved != ours:
            raise ValueError(
                f"{path} is a checkpoint of recipe {saved['name']!r} ({saved['scene']}), but the config is "
                f"recipe {ours['name']!r} ({ours['scene']}); pass that recipe's config with -c, or omit -c to use "
                "the config saved in the checkpoint's run folder"
            )
