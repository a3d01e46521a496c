"""What every speed measurement shares: its settings, its result, and its inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

PROMPTS = ["church", "", "a church on a hill", "a church in the snow", "a chapel by a lake", "a church at night"]


@dataclass
class Settings:
    model: str
    device: torch.device
    steps: int  # timed steps, after one warm-up step
    batch: int  # ours: latents per step and process
    ddim_steps: int
    gen_steps: int
    precision: str  # ours: no | bf16 (the reference is always fp32)
    gc: bool  # ours: gradient checkpointing
    compile: bool  # ours: torch.compile the UNet that runs forward and backward


class Timing(NamedTuple):
    s_per_step: float
    items_per_step: int  # latents (esd, reo, ti, scale: over all processes) or images (gen)


@dataclass
class Workload:
    """The inputs of every phase, from the measuring process's own pipeline."""

    conds: dict[str, torch.Tensor]  # negatives (2, L, D), uncond (1, L, D), anchors (2, L, D)
    latents: torch.Tensor  # (4, 4, h, w) stand-ins for the concept gallery (inversion)
    prompts: list[str]  # evaluation prompts (generation)
    latent_size: int

    @classmethod
    def build(cls, pipe, resolution: int) -> "Workload":
        device = pipe.unet.device
        latent = resolution // pipe.vae_scale_factor
        ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            emb = pipe.text_encoder(ids.to(device))[0].float()
        latents = torch.randn(4, 4, latent, latent, generator=torch.Generator().manual_seed(0)).to(device)
        return cls(conds={"negatives": emb[[0, 4]], "uncond": emb[1:2], "anchors": emb[2:4]}, latents=latents,
                   prompts=[p for p in PROMPTS if p] * 2, latent_size=latent)


def maybe_compile(unet, s: Settings):
    return torch.compile(unet) if s.compile else unet
