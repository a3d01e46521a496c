"""Image generation with a diffusers pipeline: batched prompts, one seed per image, grids."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    *,
    prompt_embeds: torch.Tensor | None = None,
    steps: int = 25,
    guidance: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
) -> list[Image.Image]:
    """One image per prompt (or per row of `prompt_embeds`, (N, L, D)), image i from `seeds[i]`.

    Each image has its own generator, so an image does not depend on its batch neighbours and
    a resumed or sharded evaluation reproduces it exactly.
    """
    count = len(prompts) if prompts is not None else prompt_embeds.shape[0]
    seeds = list(range(count)) if seeds is None else list(seeds)
    if len(seeds) != count:
        raise ValueError(f"got {count} prompts but {len(seeds)} seeds")
    device = pipe.unet.device
    images: list[Image.Image] = []
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[start:stop]]
        latents = _initial_latents(pipe, generators, height, width, device)
        kwargs = {"prompt": list(prompts[start:stop])} if prompts is not None else {
            "prompt_embeds": prompt_embeds[start:stop].to(device, pipe.unet.dtype),
            "negative_prompt_embeds": _empty_embeds(pipe, stop - start),
        }
        out = pipe(
            **kwargs, latents=latents, num_inference_steps=steps, guidance_scale=guidance,
            height=height, width=width, output_type="pil",
        )
        images.extend(out.images)
    return images


def _initial_latents(pipe, generators, height, width, device) -> torch.Tensor:
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    h = (height or size) // pipe.vae_scale_factor
    w = (width or size) // pipe.vae_scale_factor
    noise = [torch.randn((1, pipe.unet.config.in_channels, h, w), generator=g) for g in generators]
    return torch.cat(noise).to(device, pipe.unet.dtype)


def _empty_embeds(pipe, count: int) -> torch.Tensor:
    ids = pipe.tokenizer([""] * count, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids.to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0].to(pipe.unet.dtype)


def image_grid(images: Sequence[Image.Image], cols: int) -> Image.Image:
    """Tile images row by row into one picture."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid
