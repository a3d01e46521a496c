"""Tiny SD 1.5, SD 2.x and SDXL pipelines: each family's real classes and layout, tiny widths, seeded.

What a family changes, and what these builders keep as published (only widths and depths shrink):
- SD 1.5 (`stable-diffusion-v1-5/stable-diffusion-v1-5`): SD 1.4's architecture; its own scheduler
  config (PNDM, `clip_sample=False`). The rehearsal is stereo.models.rehearsal's with that scheduler.
- SD 2.x (`stabilityai/stable-diffusion-2-1`, `-2-1-base`): an OpenCLIP ViT-H text tower (`gelu`, its
  pad token is "!"), a UNet with linear projections in the transformers and per-level head counts
  (5, 10, 20, 20), 1024-wide cross-attention. 2.1 (768 px) predicts v with DDIM; 2.1-base (512 px)
  predicts epsilon with PNDM; 2.1's UNet upcasts attention to fp32.
- SDXL (`stabilityai/stable-diffusion-xl-base-1.0`): two text towers (CLIP ViT-L, and OpenCLIP bigG
  with a projection whose pooled output conditions the UNet), cross-attention over their concatenated
  penultimate states (768 + 1280), the "text_time" added conditioning (pooled text + 6 size/crop
  numbers, each embedded in 256 sinusoids), 3 UNet levels with (1, 2, 10) transformer layers, Euler
  with "leading" spacing, a VAE with scaling factor 0.13025, zeros as the empty prompt's embedding.

Use a folder like the real model:

    python -m stereo.models.families sdxl /tmp/sdxl-rehearsal
    python train.py model=sdxl model.pretrained=/tmp/sdxl-rehearsal model.resolution=64 ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTextModelWithProjection

from stereo.models.rehearsal import sd14_rehearsal_pipeline
from stereo.models.tiny import load_clip_tokenizer, tiny_text_config

FAMILIES = ("sd15", "sd21", "sd21-base", "sdxl")
RESOLUTION = 64  # pixels of every family's rehearsal; latents are 8x8 (8x downsampling, as the real VAEs)
EXCLAMATION_ID = 0  # "!" is id 0 in CLIP's vocabulary: SD 2.x's and SDXL's second tokenizer pad with it

# scheduler/scheduler_config.json of each hub repo, as published (the `_` keys dropped).
SD15_SCHEDULER_CONFIG = {  # stable-diffusion-v1-5/stable-diffusion-v1-5
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}
SD21_SCHEDULER_CONFIG = {  # stabilityai/stable-diffusion-2-1 (768 px, v-prediction)
    "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
SD21_BASE_SCHEDULER_CONFIG = {  # stabilityai/stable-diffusion-2-1-base (512 px, epsilon)
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
SDXL_SCHEDULER_CONFIG = {  # stabilityai/stable-diffusion-xl-base-1.0
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
_SCHEDULERS = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler,
               "EulerDiscreteScheduler": EulerDiscreteScheduler}

# Tiny SDXL widths: tower 1 (CLIP ViT-L, 768 real), tower 2 (bigG, 1280 real) and its projection (pooled,
# 1280 real), the per-number embedding of the 6 size/crop numbers (256 real).
SDXL_D1, SDXL_D2, SDXL_D_POOL, SDXL_TIME_DIM = 32, 64, 64, 8


def scheduler_from(config: dict):
    """The published scheduler config as its own class builds it."""
    cls = _SCHEDULERS[config["_class_name"]]
    return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def _tiny_vae(scaling_factor: float, force_upcast: bool = True) -> AutoencoderKL:
    """The SD VAE layout (4 levels, 2 layers each, 8x downsampling) with widths 8/16/32/32."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, norm_num_groups=8, act_fn="silu", sample_size=RESOLUTION, scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


# --------------------------------------------------------------------------------------------
# SD 1.5
# --------------------------------------------------------------------------------------------
def tiny_sd15_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD 1.5's layout: SD 1.4's rehearsal (stereo.models.rehearsal) with SD 1.5's scheduler config."""
    pipe = sd14_rehearsal_pipeline(seed)
    pipe.scheduler = scheduler_from(SD15_SCHEDULER_CONFIG)
    return pipe


# --------------------------------------------------------------------------------------------
# SD 2.x
# --------------------------------------------------------------------------------------------
def sd2_unet(cross_attention_dim: int = 32, upcast_attention: bool = True) -> UNet2DConditionModel:
    """SD 2's UNet layout (4 levels, 2 layers, linear projections, heads per level as (5, 10, 20, 20)
    at 64 channels a head) with widths 32/32/64/64 and 16 channels a head."""
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=(2, 2, 4, 4), use_linear_projection=True,
        upcast_attention=upcast_attention, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
        downsample_padding=1, mid_block_scale_factor=1, norm_eps=1e-5, center_input_sample=False,
    )


def tiny_sd2_pipeline(seed: int = 0, prediction_type: str = "v_prediction") -> StableDiffusionPipeline:
    """A tiny SD 2.1 (`prediction_type="v_prediction"`: DDIM as 2.1 ships) or SD 2.1-base (`"epsilon"`: PNDM).

    OpenCLIP-ViT-H-style text tower (gelu, width 32, 2 layers), pad token "!", SD 2's UNet layout,
    the SD VAE (scaling 0.18215); no safety checker, as 2.1's model_index.json.
    """
    if prediction_type not in ("v_prediction", "epsilon"):
        raise ValueError(f"prediction_type {prediction_type!r}: SD 2.1 uses v_prediction, 2.1-base epsilon")
    v_pred = prediction_type == "v_prediction"
    torch.manual_seed(seed)
    vae = _tiny_vae(0.18215, force_upcast=True)
    text_encoder = CLIPTextModel(tiny_text_config(32, act="gelu", pad_id=EXCLAMATION_ID))
    unet = sd2_unet(cross_attention_dim=32, upcast_attention=v_pred)
    scheduler = scheduler_from(SD21_SCHEDULER_CONFIG if v_pred else SD21_BASE_SCHEDULER_CONFIG)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=load_clip_tokenizer("!"), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
        requires_safety_checker=False,
    )


# --------------------------------------------------------------------------------------------
# SDXL
# --------------------------------------------------------------------------------------------
def sdxl_unet() -> UNet2DConditionModel:
    """SDXL base's UNet layout: 3 levels (no attention at the first), (1, 2, 10) -> (1, 1, 2) transformer
    layers, linear projections, "text_time" added conditioning; widths 32/64/64."""
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        cross_attention_dim=SDXL_D1 + SDXL_D2, addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_DIM, addition_embed_type_num_heads=64,
        projection_class_embeddings_input_dim=SDXL_D_POOL + 6 * SDXL_TIME_DIM,
        norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
        mid_block_scale_factor=1, norm_eps=1e-5, center_input_sample=False,
    )


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A tiny SDXL base: CLIPTextModel (width 32, quick_gelu) + CLIPTextModelWithProjection (width 64, gelu,
    projection 64), cross-attention 96 wide, added conditioning 64 + 6 * 8, Euler as published, VAE 0.13025."""
    torch.manual_seed(seed)
    vae = _tiny_vae(0.13025, force_upcast=True)
    text_encoder = CLIPTextModel(tiny_text_config(SDXL_D1))
    text_encoder_2 = CLIPTextModelWithProjection(
        tiny_text_config(SDXL_D2, act="gelu", pad_id=EXCLAMATION_ID, projection_dim=SDXL_D_POOL))
    unet = sdxl_unet()
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=load_clip_tokenizer(),
        tokenizer_2=load_clip_tokenizer("!"), unet=unet, scheduler=scheduler_from(SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


# --------------------------------------------------------------------------------------------
# Rehearsal folders
# --------------------------------------------------------------------------------------------
def family_pipeline(family: str, seed: int = 0):
    """The tiny pipeline of `family` (one of FAMILIES)."""
    builders = {
        "sd15": lambda: tiny_sd15_pipeline(seed),
        "sd21": lambda: tiny_sd2_pipeline(seed, "v_prediction"),
        "sd21-base": lambda: tiny_sd2_pipeline(seed, "epsilon"),
        "sdxl": lambda: tiny_sdxl_pipeline(seed),
    }
    if family not in builders:
        raise ValueError(f"family {family!r} is not valid; choose one of {', '.join(FAMILIES)}")
    return builders[family]()


def save_family_rehearsal(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Write `family`'s tiny pipeline to `folder` in diffusers' layout (model_index.json + one folder per part)."""
    folder = Path(folder)
    family_pipeline(family, seed).save_pretrained(folder, safe_serialization=True)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("folder", type=Path, help="where to write the pipeline folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = save_family_rehearsal(args.family, args.folder, args.seed)
    print(f"wrote a {args.family}-shaped rehearsal pipeline to {path}; use model={args.family} "
          f"model.pretrained={path} model.resolution={RESOLUTION}")


if __name__ == "__main__":
    main()
