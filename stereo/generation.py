"""Image generation with a diffusers pipeline: prompt encoding, batched prompts, one seed per image, grids."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import torch
from accelerate.utils import extract_model_from_parallel
from PIL import Image

from stereo.export import cast_copy, merged_unet


def prompt_ids(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """(K, 77) token ids, padded and truncated to `model_max_length` as StableDiffusionPipeline does."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_ids(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """(K, 77, D) text-encoder states (last hidden layer, what the UNet reads) of token ids."""
    return text_encoder(ids.to(text_encoder.device))[0]


def encode_prompts(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """(K, 77, D) text-encoder states of `prompts`, in the text encoder's dtype and on its device.

    Learned tokens are included: a multi-vector token is expanded to its `<tok>_1 ...` pieces as
    diffusers does (`maybe_convert_prompt`); prompts without learned tokens are read unchanged.
    """
    prompts = [pipe.maybe_convert_prompt(p, pipe.tokenizer) for p in prompts]
    return encode_ids(pipe.text_encoder, prompt_ids(pipe.tokenizer, prompts))


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
            "negative_prompt_embeds": encode_prompts(pipe, [""] * (stop - start)).to(pipe.unet.dtype),
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
    or latents. `for_generation=False` (attacks: they never decode latents) uses `unet` as it is, so an
    fp32 erased UNet is attacked at its own precision.
    """
    dtype, device = pipe.vae.dtype, pipe.vae.device
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
