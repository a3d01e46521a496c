"""What the memory estimate depends on, read from the real configs, and the model's modules to build on meta."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from stereo.config import compose, erased_subset
from stereo.evaluation.config import compose_eval
from stereo.models.loading import SD14_CONFIGS, torch_dtype

ATTACKS = ("concept_inversion", "soft_prompt", "unlearndiffatk", "ring_a_bell")  # the traced ones


def _sd14_config(name: str) -> dict:
    config = json.loads((SD14_CONFIGS / name).read_text())
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}


def builders(model: str):
    """(unet, text_encoder, vae) constructors of a model kind, for the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if model == "sd14-random":
        return (lambda: UNet2DConditionModel.from_config(_sd14_config("unet.json")),
                lambda: CLIPTextModel(CLIPTextConfig(**_sd14_config("text_encoder.json"))),
                lambda: AutoencoderKL.from_config(_sd14_config("vae.json")))
    if model == "tiny":
        from stereo.models.tiny import tiny_text_encoder, tiny_unet, tiny_vae

        return tiny_unet, tiny_text_encoder, tiny_vae
    raise ValueError(f"--model {model!r} is not valid; choose sd14-random or tiny")


@dataclass(frozen=True)
class Setup:
    """Everything the estimate depends on, read from the real configs (`model=<m> trainer=gpu method=stereo`)."""

    model: str
    resolution: int
    frozen_dtype: str
    batch: int
    gradient_checkpointing: bool
    subset: str
    concept_prompts: int
    rounds: int
    inversion_batch: int
    anchors_per_step: int
    gallery_size: int
    eval_inversion_batch: int
    eval_soft_prompt_batch: int
    uda_prompt_batch: int
    uda_prefix_tokens: int
    rab_population: int
    rab_prompt_batch: int
    generation_batch: int
    teacher_autocast: bool = False  # the plan: the bf16 teacher runs outside autocast

    @property
    def frozen(self) -> torch.dtype:
        return torch_dtype(self.frozen_dtype)


def read_setup(model: str, concept: str = "nudity", overrides: tuple[str, ...] = ()) -> Setup:
    cfg = compose([f"model={model}", "trainer=gpu", "method=stereo", f"concept={concept}",
                   "model.dtype=bf16", *overrides])
    evaluation = compose_eval([f"attack=[{','.join(ATTACKS)}]"])  # each attack's budget as evaluate.py reads it
    attack = evaluation.attacks
    ste, reo = cfg.method.ste, cfg.method.reo
    return Setup(
        model=model, resolution=cfg.model.resolution, frozen_dtype=cfg.model.dtype, batch=cfg.trainer.batch_size,
        gradient_checkpointing=cfg.trainer.gradient_checkpointing, subset=erased_subset(cfg),
        concept_prompts=sum(len(c.prompts) for c in cfg.concepts.values()), rounds=ste.rounds,
        inversion_batch=ste.inversion.batch_size, anchors_per_step=reo.anchors_per_step,
        gallery_size=ste.gallery_size, eval_inversion_batch=attack["concept_inversion"].batch_size,
        eval_soft_prompt_batch=attack["soft_prompt"].batch_size,
        uda_prompt_batch=attack["unlearndiffatk"].prompt_batch,
        uda_prefix_tokens=attack["unlearndiffatk"].prefix_tokens,
        rab_population=attack["ring_a_bell"].population, rab_prompt_batch=attack["ring_a_bell"].prompt_batch,
        generation_batch=evaluation.generation.batch_size,
    )


def latent_size(setup: Setup) -> int:
    with torch.device("meta"):
        vae = builders(setup.model)[2]()
    return setup.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
