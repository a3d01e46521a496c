"""What every erasure recipe (ESD, STE, REO) sets up the same way: accelerator, base pipeline,
text embeddings, student/teacher UNets, loggers, sample grids, exports and run provenance."""

from __future__ import annotations

import copy
import logging
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    set_seed,
)
from omegaconf import OmegaConf

from stereo.attacks.inversion import encode_prompts
from stereo.attacks.parallel import main_process_value, on_main
from stereo.config import erased_subset, to_container
from stereo.erasure.subsets import add_lora, select_trainable
from stereo.erasure.trainer import TrainerSettings
from stereo.export import export_erased
from stereo.generation import generate, image_grid, swap_unet
from stereo.manifest import build_manifest, write_json_atomic
from stereo.models.loading import load_pipeline

log = logging.getLogger(__name__)


class Session:
    """One run: `cfg` resolved, output folder prepared, base pipeline on the accelerator's device."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.seed = cfg.seed
        set_seed(cfg.seed)
        self.accelerator = make_accelerator(cfg)
        self.output_dir = self._shared_output_dir()
        self.config = to_container(cfg)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            write_json_atomic(self.output_dir / "run.json", build_manifest(
                self.config, self.seed, num_processes=self.accelerator.num_processes))
        self._init_logger()
        self.pipe = load_pipeline(cfg.model)
        self.pipe.to(self.accelerator.device)
        self.pipe.text_encoder.requires_grad_(False)
        self.pipe.vae.requires_grad_(False)
        self.pipe.unet.requires_grad_(False)
        self.base_unet = self.pipe.unet
        self.subset = erased_subset(cfg)
        self._log_step = 0

    def _shared_output_dir(self) -> Path:
        """Rank 0's output folder, for every rank (`main_process_value`)."""
        self.cfg.output_dir = main_process_value(str(self.cfg.output_dir))
        return Path(self.cfg.output_dir)

    def from_main_process(self, fetch):
        """`fetch()` run by the main process alone and its result given to every process (`on_main`).

        For what must be the same everywhere but may differ per call (an LLM's reply). A failure on
        the main process is raised on every process, so none waits for a result that never comes.
        """
        return on_main(fetch, self.accelerator, share=True)

    # -- text ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(K, 77, D) CLIP text-encoder hidden states, as the UNet consumes them (learned tokens included)."""
        return encode_prompts(self.pipe, list(prompts)).float()

    def concept_prompts(self) -> list[str]:
        return [p for concept in self.cfg.concepts.values() for p in concept.prompts]

    # -- models --------------------------------------------------------------------------------
    def make_student(self, init=None):
        """A trainable fp32 copy of `init` (default: the base UNet) with the configured subset or LoRA.

        Returns (student, teacher, trainable_names); teacher is None with LoRA (adapter disabled = base).
        """
        init = self.base_unet if init is None else init
        student = copy.deepcopy(init).float()
        lora = self.cfg.method.lora
        if lora.enabled:
            names = add_lora(student, self.subset, lora.rank, lora.alpha, lora.dropout)
            teacher = None
        else:
            names = select_trainable(student, self.subset)
            teacher = init
        return student, teacher, names

    def trainer_settings(self, steps: int | None = None, lr: float | None = None, desc: str = "erase",
                         resume: bool | None = None, checkpoint_every: int | None = None) -> TrainerSettings:
        t, m = self.cfg.trainer, self.cfg.method
        return TrainerSettings(
            steps=steps if steps is not None else t.steps, lr=lr if lr is not None else t.lr,
            batch_size=t.batch_size, grad_accum=t.grad_accum, weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm, gradient_checkpointing=t.gradient_checkpointing,
            checkpoint_every=t.checkpoint_every if checkpoint_every is None else checkpoint_every,
            checkpoints_total_limit=t.checkpoints_total_limit, resume=t.resume if resume is None else resume,
            log_every=t.log_every, sample_every=t.sample_every, ddim_steps=m.ddim_steps,
            sample_guidance=m.sample_guidance,
            latent_size=self.cfg.model.resolution // self.pipe.vae_scale_factor, seed=self.seed, desc=desc,
        )

    # -- logging -------------------------------------------------------------------------------
    def _init_logger(self) -> None:
        if self.cfg.logger.name != "wandb":
            return
        self.accelerator.init_trackers(
            self.cfg.logger.project, config=self.config,
            init_kwargs={"wandb": {"mode": self.cfg.logger.mode, "dir": str(self.output_dir)}},
        )

    def log(self, step: int, metrics: dict) -> None:
        self._log_step += 1
        self.accelerator.log(metrics, step=self._log_step)

    def sampler(self, prompts: list[str], desc: str):
        """An `on_sample` callback for the trainer: a base-vs-erased grid named after the step."""
        return lambda step, unet: self.save_samples(unet, prompts, f"{desc}_step{step:07d}")

    def save_samples(self, unet, prompts: list[str], name: str, seeds=(0, 1)) -> Path | None:
        """A grid (rows: base model, erased model; columns: prompt × seed) saved as PNG and logged."""
        if not self.accelerator.is_main_process:
            return None
        t = self.cfg.trainer
        cols = [(p, s) for p in prompts for s in seeds]
        images = []
        for model in (self.base_unet, unet):  # the student is generated from as a frozen copy
            with swap_unet(self.pipe, model) as pipe:
                images += generate(pipe, [p for p, _ in cols], [s for _, s in cols], steps=t.sample_steps,
                                   guidance=t.sample_guidance, height=self.cfg.model.resolution,
                                   width=self.cfg.model.resolution)
        path = self.output_dir / "samples" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid = image_grid(images, cols=len(cols))
        grid.save(path)
        if self.cfg.logger.name == "wandb" and self.cfg.logger.log_images:
            import wandb

            self.accelerator.get_tracker("wandb", unwrap=True).log({f"samples/{name}": wandb.Image(grid)})
        return path

    # -- outputs -------------------------------------------------------------------------------
    def export(self, unet, trainable_names: list[str], name: str = "export", **extra) -> Path | None:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        manifest = build_manifest(self.config, self.seed, subset=self.subset,
                                  lora=bool(self.cfg.method.lora.enabled), **extra)
        pipe = self.pipe if "pipeline" in self.cfg.export.formats else None  # saved from where it is
        path = export_erased(self.output_dir / name, unet, trainable_names, list(self.cfg.export.formats),
                             manifest, pipe=pipe)
        log.info("exported %s to %s", ", ".join(self.cfg.export.formats), path)
        return path

    def close(self) -> None:
        """End the trackers and release accelerate's process-wide state (it fixes mixed precision at first
        use), so the next run in this process (a --multirun sweep, a notebook, a test) may choose its own."""
        self.accelerator.end_training()
        AcceleratorState._reset_state()


def make_accelerator(cfg) -> Accelerator:
    """The run's Accelerator. DDP gradient buckets are views of the gradients (one copy less of the trained
    subset per GPU), and collectives wait `trainer.dist_timeout_minutes` (main-process-only phases such as
    writing checkpoints and exports of SD 1.4 can outlast NCCL's 10-minute default)."""
    t = cfg.trainer
    cpu = t.cpu or cfg.model.device == "cpu" or not torch.cuda.is_available()
    return Accelerator(
        mixed_precision=t.mixed_precision, cpu=cpu, log_with="wandb" if cfg.logger.name == "wandb" else None,
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True),
                         InitProcessGroupKwargs(timeout=timedelta(minutes=t.dist_timeout_minutes))],
    )
