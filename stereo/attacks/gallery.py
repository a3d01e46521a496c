"""Images of the concept from the ORIGINAL model, generated once and cached on disk.

Concept inversion (Pham et al. 2023) learns a token that makes the erased model reproduce
these images; STE splits one gallery across its rounds or shares it (STEREO.md, Stage 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from stereo.conditioning import is_sdxl
from stereo.generation import generate, open_rgb
from stereo.manifest import write_json_atomic
from stereo.parallel import is_main, on_main, rank_and_world, wait_for_everyone


def concept_gallery(pipe, prompts: list[str], n: int, cache_dir: str | Path, *, seed: int = 0, steps: int = 50,
                    guidance: float = 7.5, resolution: int | None = None, batch_size: int = 8,
                    accelerator=None) -> list[Image.Image]:
    """`n` images cycling over `prompts` (image i: prompt i mod len, seed seed+i), reused if cached.

    The cache folder holds `index.json` describing exactly what was generated; a request that
    differs in any field regenerates rather than silently reusing other images. With an
    `accelerator` of several processes, process r generates the images i = r (mod processes)
    (a 500-image gallery would otherwise keep the other GPUs waiting past NCCL's timeout); every
    process must call this. Each image has its own seed, so the gallery is the same for any
    number of processes.
    """
    if not prompts or n < 1:
        raise ValueError(f"a gallery needs prompts and n >= 1 (got {len(prompts)} prompts, n={n})")
    cache_dir = Path(cache_dir)
    items = [{"prompt": prompts[i % len(prompts)], "seed": seed + i, "file": f"{i:05d}.png"} for i in range(n)]
    spec = {"items": items, "steps": steps, "guidance": guidance, "resolution": resolution}
    index = cache_dir / "index.json"
    # the main process decides for all: processes that saw the index differently (NFS attribute caching,
    # several nodes) would enter different numbers of collectives below and hang
    cached = on_main(lambda: index.is_file() and json.loads(index.read_text()) == spec, accelerator, share=True)
    wait_for_everyone(accelerator)  # the main process has read the index before it changes
    if not cached:
        if is_main(accelerator):
            index.unlink(missing_ok=True)  # a killed run must not leave an old index over new images
        rank, world = rank_and_world(accelerator)
        mine = items[rank::world]
        images = generate(pipe, [i["prompt"] for i in mine], [i["seed"] for i in mine], steps=steps,
                          guidance=guidance, height=resolution, width=resolution, batch_size=batch_size)
        cache_dir.mkdir(parents=True, exist_ok=True)
        for item, image in zip(mine, images):
            image.save(cache_dir / item["file"])
        wait_for_everyone(accelerator)
        if is_main(accelerator):
            write_json_atomic(index, spec)  # written last: a partial gallery is never mistaken for a finished one
        wait_for_everyone(accelerator)
    return [open_rgb(cache_dir / item["file"]) for item in items]  # PNG is lossless: as generated


@torch.no_grad()
def encode_images(pipe, images: list[Image.Image], batch_size: int = 8) -> torch.Tensor:
    """VAE latents (N, 4, h, w) scaled like the UNet's training data (mean of the posterior × scaling).

    SDXL's VAE overflows in fp16 (its config says `force_upcast`): there it encodes in fp32, as the SDXL
    pipelines do, and is put back in its dtype afterwards.
    """
    processor, vae = pipe.image_processor, pipe.vae
    device, dtype = vae.device, vae.dtype
    upcast = is_sdxl(pipe) and dtype == torch.float16 and vae.config.get("force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        latents = []
        for start in range(0, len(images), batch_size):
            pixels = processor.preprocess(images[start:start + batch_size]).to(device, vae.dtype)
            latents.append(vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor)
    finally:
        if upcast:
            vae.to(dtype)
    return torch.cat(latents).float()
