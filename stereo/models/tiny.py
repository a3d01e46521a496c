"""Small Stable-Diffusion-shaped components, built from configs, fully offline.

The tokenizer is the real CLIP BPE (the one SD 1.4 uses) truncated to its first 7,678
merges: token ids coincide with CLIP ViT-L/14's for the 8,190 most frequent pieces, and the
vocabulary shrinks from 49,408 to 8,192 so small models stay small.
"""

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from stereo.models import assemble_pipeline

TOKENIZER_DIR = Path(__file__).parent / "clip_tokenizer"
BOS_ID, EOS_ID = 8190, 8191  # <|startoftext|>, <|endoftext|> in the truncated vocabulary


def load_clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The truncated CLIP tokenizer shipped with the package (77 tokens), padding with `pad_token`:
    <|endoftext|> as SD 1.x and SDXL's first tokenizer, "!" as SD 2.x and SDXL's tokenizer_2."""
    return CLIPTokenizer(
        str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=77, pad_token=pad_token
    )


def sd_scheduler() -> DDIMScheduler:
    """The SD 1.x noise schedule (scaled-linear betas 0.00085..0.012, 1000 steps) as DDIM."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


def tiny_text_config(hidden: int = 64, layers: int = 2, act: str = "quick_gelu", pad_id: int = EOS_ID,
                     projection_dim: int | None = None) -> CLIPTextConfig:
    """A CLIP text tower over the truncated vocabulary: 77 positions, 2 heads, MLP 2 x `hidden` wide; `act` "quick_gelu"
    as CLIP ViT-L/14 (SD 1.x, SDXL's first tower), "gelu" as OpenCLIP (SD 2.x, SDXL's second)."""
    return CLIPTextConfig(
        vocab_size=8192, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=77, hidden_act=act, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=pad_id, projection_dim=projection_dim or hidden,
    )


def tiny_text_encoder(hidden: int = 64, layers: int = 2) -> CLIPTextModel:
    return CLIPTextModel(tiny_text_config(hidden, layers))


def tiny_unet(cross_attention_dim: int = 64, sample_size: int = 16) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=16,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, norm_num_groups=8,
        sample_size=32,
    )


def tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised SD-shaped pipeline: 32 px images, 16x16x4 latents, ~1 M UNet params."""
    torch.manual_seed(seed)
    return assemble_pipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(), tokenizer=load_clip_tokenizer(),
                             unet=tiny_unet(), scheduler=sd_scheduler())
