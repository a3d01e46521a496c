"""The run context every erasure recipe starts from: accelerator, base pipeline, output folder, provenance.

`RunContext(cfg)` seeds everything, makes the accelerator, agrees on one output folder across
processes, writes the resolved config and manifest there (`config.yaml`, `run.json`), starts the
logger and loads the base pipeline, frozen, onto the run's device. Recipes build on it with small
helpers: `subsets.make_student`, `TrainerSettings.from_config`, `previews.save_samples`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from omegaconf import OmegaConf

from stereo import parallel
from stereo.conditioning import text_towers
from stereo.config import erased_subset, kept_concepts, to_container
from stereo.erasure.objectives import Preservation
from stereo.export import export_erased
from stereo.generation import encode_prompts
from stereo.manifest import build_manifest, write_json_atomic
from stereo.models.loading import load_pipeline
from stereo.parallel import main_process_value, on_main

log = logging.getLogger(__name__)


class RunContext:
    """One run: `cfg` resolved, output folder prepared, base pipeline on the accelerator's device.

    Use it as a context manager (or call `close()`): it ends the trackers and releases accelerate's
    process-wide state, so the next run in this process may choose its own mixed precision.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.seed = cfg.seed
        set_seed(cfg.seed)
        self.accelerator = make_accelerator(cfg)
        cfg.output_dir = main_process_value(str(cfg.output_dir))  # rank 0's folder (`${now}`) for every rank
        self.output_dir = Path(cfg.output_dir)
        self.config = to_container(cfg)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            write_json_atomic(self.output_dir / "run.json", build_manifest(
                self.config, self.seed, num_processes=self.accelerator.num_processes))
        if cfg.logger.name == "wandb":
            self.accelerator.init_trackers(cfg.logger.project, config=self.config, init_kwargs={
                "wandb": {"mode": cfg.logger.mode, "dir": str(self.output_dir)}})
        self.pipe = load_pipeline(cfg.model)
        self.pipe.to(self.accelerator.device)
        for frozen_part in (*(encoder for _, encoder in text_towers(self.pipe)), self.pipe.vae, self.pipe.unet):
            frozen_part.requires_grad_(False)
        self.base_unet = self.pipe.unet
        self.subset = erased_subset(cfg)
        self._logged = 0

    def __enter__(self) -> "RunContext":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """End the trackers, the process group and accelerate's process-wide state (`parallel.release`)."""
        parallel.release(self.accelerator)

    def from_main_process(self, fetch):
        """`fetch()` run by the main process alone and its result given to every process (`on_main`).

        For what must be the same everywhere but may differ per call (an LLM's reply). A failure on
        the main process is raised on every process, so none waits for a result that never comes.
        """
        return on_main(fetch, self.accelerator, share=True)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(K, L, D) fp32 conditions, as the UNet consumes them (learned tokens included; SDXL: L = 78, the pooled
        embedding packed as the last row, `stereo.conditioning`)."""
        return encode_prompts(self.pipe, list(prompts)).float()

    def concept_prompts(self) -> list[str]:
        return [p for concept in self.cfg.concepts.values() for p in concept.prompts]

    def neighbours(self) -> dict[str, list[str]]:
        """Concepts to keep, name -> prompts (`stereo.config.kept_concepts`)."""
        return kept_concepts(self.cfg)

    def preservation(self) -> dict:
        """The objectives' preservation arguments (`method.preserve`): kept prompts encoded and lambda, or none."""
        keep = self.cfg.method.preserve
        if keep.weight == 0:
            return {}
        prompts = list(keep.prompts) or [p for prompts in self.neighbours().values() for p in prompts]
        return {"preserve": Preservation(self.encode(prompts), keep.weight, str(keep.latents), keep.per_latent,
                                         keep.focus)}

    @property
    def latent_size(self) -> int:
        return self.cfg.model.resolution // self.pipe.vae_scale_factor

    def log(self, step: int | None, metrics: dict) -> None:
        """Log `metrics` at the caller's `step`, recorded as `local_step`. The trackers' own step counts log
        calls instead: wandb needs one increasing step per run, and each trainer of a run (every STE round,
        then REO) counts its steps from 1 again."""
        self._logged += 1
        self.accelerator.log(metrics if step is None else {**metrics, "local_step": step}, step=self._logged)

    def export(self, unet, trainable_names: list[str], name: str = "export", **extra) -> Path | None:
        """`export_erased` into `output_dir/name` with the run's manifest (+ `extra`); main process only."""
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


def make_accelerator(cfg) -> Accelerator:
    """The run's Accelerator: `trainer.mixed_precision`, collectives that wait `trainer.dist_timeout_minutes`
    (`stereo.parallel.make_accelerator`), and DDP gradient buckets that are views of the gradients (one copy
    less of the trained subset per GPU)."""
    t = cfg.trainer
    cpu = t.cpu or cfg.model.device == "cpu" or not torch.cuda.is_available()
    return parallel.make_accelerator(
        cpu, t.dist_timeout_minutes, [DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
        mixed_precision=t.mixed_precision, log_with="wandb" if cfg.logger.name == "wandb" else None)
