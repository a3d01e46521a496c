"""A Stable-Diffusion-1.4-shaped pipeline with tiny widths, for rehearsing the real path without weights.

Everything a `model=sd14` run touches is as in `CompVis/stable-diffusion-v1-4`: the component
classes, the block layout (4 UNet levels, 3 cross-attention down blocks, 2 layers per block, 8
attention heads; a 4-level VAE with 8x downsampling; a CLIP text tower), the scheduler config as
published (PNDM with `skip_prk_steps`, `steps_offset=1`), the `model_index.json` layout with a
safety checker and feature extractor on disk (which stereo loads with `safety_checker=None`).
Only the widths are tiny, so a rehearsal runs on a CPU in seconds. Write one and use it like the
real model:

    python -m stereo.models.rehearsal /tmp/sd14-rehearsal
    python train.py model=sd14 model.pretrained=/tmp/sd14-rehearsal model.resolution=64 trainer=gpu ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextModel

from stereo.models import assemble_pipeline
from stereo.models.tiny import BOS_ID, EOS_ID, load_clip_tokenizer, tiny_text_config

RESOLUTION = 64  # pixels; latents are 8x8 (the VAE downsamples 8x, as SD's)

# CompVis/stable-diffusion-v1-4 scheduler/scheduler_config.json, as published.
SD14_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def sd14_scheduler() -> PNDMScheduler:
    """SD 1.4's own scheduler: PNDM (PLMS steps), exactly as its published config builds it."""
    return PNDMScheduler.from_config(SD14_SCHEDULER_CONFIG)


def rehearsal_unet() -> UNet2DConditionModel:
    """SD 1.4's UNet layout (unet.json) with widths 32/32/64/64 and a 32-wide cross-attention."""
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
        freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, norm_eps=1e-5, center_input_sample=False,
    )


def rehearsal_vae() -> AutoencoderKL:
    """SD 1.4's VAE layout (vae.json: 4 levels, 2 layers each, scaling 0.18215) with widths 8/16/32/32."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, norm_num_groups=8, act_fn="silu", sample_size=RESOLUTION, scaling_factor=0.18215,
    )


def rehearsal_text_encoder() -> CLIPTextModel:
    """CLIP ViT-L/14's text tower (quick_gelu, 77 positions) at width 32, 2 layers, the truncated vocabulary."""
    return CLIPTextModel(tiny_text_config(hidden=32))


def rehearsal_safety_checker() -> StableDiffusionSafetyChecker:
    """A tiny safety checker, so the folder has SD 1.4's full layout (stereo loads it with safety_checker=None)."""
    config = CLIPConfig(
        text_config={"vocab_size": 8192, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": BOS_ID,
                     "eos_token_id": EOS_ID, "pad_token_id": EOS_ID},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    return StableDiffusionSafetyChecker(config)


def sd14_rehearsal_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The whole SD-1.4-shaped pipeline with seeded random weights (fp32, CPU)."""
    torch.manual_seed(seed)
    return assemble_pipeline(
        vae=rehearsal_vae(), text_encoder=rehearsal_text_encoder(), tokenizer=load_clip_tokenizer(),
        unet=rehearsal_unet(), scheduler=sd14_scheduler(), safety_checker=rehearsal_safety_checker(),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    )


def save_sd14_rehearsal(folder: str | Path, seed: int = 0) -> Path:
    """Write the rehearsal pipeline to `folder` in diffusers' layout (model_index.json + one folder per part)."""
    folder = Path(folder)
    sd14_rehearsal_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where to write the pipeline folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = save_sd14_rehearsal(args.folder, args.seed)
    print(f"wrote an SD-1.4-shaped rehearsal pipeline to {path}; use model=sd14 model.pretrained={path} "
          f"model.resolution={RESOLUTION}")


if __name__ == "__main__":
    main()
