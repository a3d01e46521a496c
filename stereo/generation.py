"""Image generation with a diffusers pipeline: prompt encoding, batched prompts, one seed per image, grids."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import torch
from accelerate.utils import extract_model_from_parallel
from PIL import Image

from stereo import conditioning
from stereo.export import cast_copy, merged_unet


def encode_prompts(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """Conditions of `prompts` as the UNet reads them, in the text encoder's dtype and on its device.

    SD 1.x / 2.x: (K, 77, D); SDXL: (K, 78, D), the pooled embedding packed as the last row
    (`stereo.conditioning`). Learned tokens are included: a multi-vector token is expanded to its
    `<tok>_1 ...` pieces as diffusers does (`maybe_convert_prompt`, per tokenizer).
    """
    return conditioning.encode(pipe, prompts)


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
    """One image per prompt (or per row of `prompt_embeds`, conditions (N, L, D) of `encode_prompts`), image i
    from `seeds[i]`.

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
        kwargs = {"prompt": list(prompts[start:stop])} if prompts is not None else _embeds_kwargs(
            pipe, prompt_embeds[start:stop].to(device, pipe.unet.dtype),
            encode_prompts(pipe, [""] * (stop - start)).to(device, pipe.unet.dtype))
        if conditioning.is_sdxl(pipe):  # the size conditioning `conditioning.predict` gives these latents
            size = tuple(conditioning.LATENT_TO_PIXEL * s for s in latents.shape[-2:])
            kwargs.update(original_size=size, target_size=size)
        out = pipe(
            **kwargs, latents=latents, num_inference_steps=steps, guidance_scale=guidance,
            height=height, width=width, output_type="pil",
        )
        images.extend(out.images)
    return images


def _embeds_kwargs(pipe, cond: torch.Tensor, uncond: torch.Tensor) -> dict:
    """The pipeline's embedding arguments for conditions and unconditional ones (SDXL: split off the pooled row)."""
    if not conditioning.is_sdxl(pipe):
        return {"prompt_embeds": cond, "negative_prompt_embeds": uncond}
    (embeds, pooled), (negative, negative_pooled) = (conditioning.split_pooled(c, pipe) for c in (cond, uncond))
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": negative, "negative_pooled_prompt_embeds": negative_pooled}


def _initial_latents(pipe, generators, height, width, device) -> torch.Tensor:
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    h = (height or size) // pipe.vae_scale_factor
    w = (width or size) // pipe.vae_scale_factor
    noise = [torch.randn((1, pipe.unet.config.in_channels, h, w), generator=g) for g in generators]
    return torch.cat(noise).to(device, pipe.unet.dtype)


def frozen_copy(unet, dtype: torch.dtype, device: torch.device | str):
    """A frozen plain copy of `unet` (a LoRA adapter folded in) in `dtype` on `device`, for generation.

    A copy, never a cast: the training student keeps its fp32 master weights (`cast_copy`).
    """
    return frozen(cast_copy(merged_unet(unet), dtype, device))


def frozen(unet):
    """`unet` itself (a LoRA adapter folded in), frozen and freed of what accelerate attached to it.

    Drops the fp32-output autocast wrapper accelerate puts on a prepared model's forward (which would
    hand fp32 latents to a half-precision VAE) and accelerate's "already prepared" mark: a student
    later copied from it (the next STE round's) would otherwise be skipped by `accelerator.prepare`
    (no autocast, no DDP wrapper).
    """
    plain = merged_unet(unet)
    plain.__dict__.pop("_is_accelerate_prepared", None)
    return extract_model_from_parallel(plain, keep_fp32_wrapper=False).eval().requires_grad_(False)


@contextlib.contextmanager
def swap_unet(pipe, unet, *, for_generation: bool = True) -> Iterator:
    """`pipe` running with `unet` in place of its own UNet, which is put back on exit (also on error).

    For generation, a frozen UNet already in the pipeline's dtype and device is used as it is; anything
    else (a student being trained, an fp32 UNet in a half-precision pipeline) is replaced by a
    `frozen_copy`, because SD 1.4's fp16/bf16 text encoder and VAE cannot run against fp32 UNet weights
    or latents. The pipeline's dtype is its text encoder's: the pipelines cast prompt embeddings and
    latents to it (SDXL upcasts an fp16 VAE to fp32 for decoding on its own, or keeps an fp32 one).
    `for_generation=False` (attacks: they never decode latents) uses `unet` as it is, so an fp32 erased
    UNet is attacked at its own precision.
    """
    dtype, device = pipe.text_encoder.dtype, pipe.text_encoder.device
    ready = unet.dtype == dtype and unet.device == device and not any(p.requires_grad for p in unet.parameters())
    own = pipe.unet
    pipe.unet = unet.eval() if ready or not for_generation else frozen_copy(unet, dtype, device)
    try:
        yield pipe
    finally:
        pipe.unet = own


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


def open_rgb(path: str | Path) -> Image.Image:
    """The image at `path` in RGB, its file closed (generated galleries, FID image folders)."""
    with Image.open(path) as image:
        return image.convert("RGB")
