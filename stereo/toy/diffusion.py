"""The toy text-to-image model: latent diffusion exactly shaped like Stable Diffusion, only small.

- VAE (AutoencoderKL): 32x32x3 images <-> 8x8x4 latents, `scaling_factor` set so scaled
  latents have unit standard deviation (as SD's 0.18215).
- Text encoder: the toy CLIP's text tower, frozen (as SD uses CLIP ViT-L/14's).
- UNet2DConditionModel on 8x8x4 latents, epsilon prediction (Ho et al. 2020, Eq. 14:
  `|| eps - eps_theta(sqrt(a_t) x_0 + sqrt(1 - a_t) eps, c, t) ||^2`), trained with 10% empty
  captions so classifier-free guidance (Ho & Salimans 2022) works; EMA of the weights is shipped.
- Scheduler: SD 1.x's DDIM schedule (`stereo.models.tiny.sd_scheduler`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPModel, CLIPTextModel

from stereo.conditioning import encode_ids
from stereo.models import assemble_pipeline
from stereo.models.tiny import load_clip_tokenizer, sd_scheduler
from stereo.toy.clip import tokenize
from stereo.toy.detector import to_tensor
from stereo.toy.fit import one_cycle_fit
from stereo.toy.scenes import IMAGE_SIZE, Scene, captions_for

LATENT_SIZE = 8


def build_toy_vae() -> AutoencoderKL:
    """32 -> 16 -> 8 px encoder (16, 32, 64 channels), 4 latent channels, and its mirror decoder."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIZE,
    )


def build_toy_unet(cross_attention_dim: int = 64, heads: int = 2) -> UNet2DConditionModel:
    """~1.1 M parameters; self- and cross-attention at 8x8 and 4x4 latent positions.

    `heads` attention heads per block (diffusers names this `attention_head_dim`): 2 heads give head
    widths of 16 and 32 channels; SD's 8 heads would leave 4-channel heads here and run 1.5x slower.
    """
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads, norm_num_groups=16,
    )


def text_encoder_from_clip(clip: CLIPModel) -> CLIPTextModel:
    """A standalone CLIPTextModel holding the toy CLIP's text tower (the pipeline's text encoder)."""
    encoder = CLIPTextModel(clip.config.text_config)
    encoder.load_state_dict(clip.text_model.state_dict())
    return encoder.eval().requires_grad_(False)


def _image_batches(images: np.ndarray, batch_size: int):
    for i in range(0, len(images), batch_size):
        yield to_tensor(images[i:i + batch_size]) * 2 - 1  # (B, 3, 32, 32) in [-1, 1]


def train_vae(images: np.ndarray, steps: int, seed: int, batch_size: int = 32, lr: float = 1e-3,
              kl_weight: float = 1e-6, log_every: int = 100) -> AutoencoderKL:
    """Reconstruction (MSE + L1) + kl_weight * KL(q(z|x) || N(0, I)), as SD's VAE minus the GAN."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    vae = build_toy_vae()
    x_all = to_tensor(images) * 2 - 1

    def batch_loss() -> torch.Tensor:
        x = x_all[torch.randint(len(x_all), (batch_size,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        return F.mse_loss(recon, x) + F.l1_loss(recon, x) + kl_weight * posterior.kl().mean()

    vae.train()
    one_cycle_fit(vae.parameters(), steps, lr, batch_loss, name="vae", pct_start=0.05, log_every=log_every)
    vae.eval().requires_grad_(False)
    mean, std = encode_posterior(vae, images[: min(len(images), 2048)])
    scale = 1.0 / (mean + std * torch.randn(mean.shape, generator=generator)).std().item()
    vae.register_to_config(scaling_factor=scale)
    return vae


@torch.no_grad()
def encode_posterior(vae: AutoencoderKL, images: np.ndarray,
                     batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled posterior mean and std, each (N, 4, 8, 8)."""
    means, stds = [], []
    for x in _image_batches(images, batch_size):
        dist = vae.encode(x).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_reconstruction_mse(vae: AutoencoderKL, images: np.ndarray) -> float:
    """Mean squared error in [0, 1] pixel units of decode(mean of encode(x))."""
    errors = []
    for x in _image_batches(images, 256):
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        errors.append(((recon.clamp(-1, 1) - x) / 2).pow(2).mean(dim=(1, 2, 3)))
    return torch.cat(errors).mean().item()


@torch.no_grad()
def encode_captions(text_encoder: CLIPTextModel, captions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """(N, 77, D) last hidden states, exactly what the SD pipeline feeds the UNet (`encode_prompts` of a bare
    text encoder, before any pipeline exists; in batches, for thousands of captions)."""
    ids = tokenize(captions)
    return torch.cat([encode_ids(text_encoder, ids[i:i + batch_size]) for i in range(0, len(ids), batch_size)])


def caption_table(scenes: Sequence[Scene]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """All captions that describe the scenes (index 0 = ""), and per scene its options (N, K) and count (N,)."""
    captions = [""] + sorted({c for s in scenes for c in captions_for(s)})
    index = {c: i for i, c in enumerate(captions)}
    options = [[index[c] for c in captions_for(s)] for s in scenes]
    width = max(len(o) for o in options)
    table = torch.tensor([o + [o[0]] * (width - len(o)) for o in options])
    counts = torch.tensor([len(o) for o in options])
    return captions, table, counts


def cosine_restarts_lr(step: int, cycles: Sequence[int], restart_peak: float = 0.5) -> float:
    """Learning-rate factor: linear warm-up (first cycle), then cosine from 1 to 0.1 in every cycle
    (lengths `cycles`; the last one repeats), each cycle's peak `restart_peak` times the previous
    one (SGDR, Loshchilov & Hutter 2017)."""
    k, u = 0, step
    while u >= cycles[min(k, len(cycles) - 1)]:
        u -= cycles[min(k, len(cycles) - 1)]
        k += 1
    cycle = cycles[min(k, len(cycles) - 1)]
    warmup = max(1, min(200, cycles[0] // 10))
    ramp = min(1.0, (step + 1) / warmup) if k == 0 else 1.0
    return float(ramp * restart_peak**k * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * u / cycle))))


def min_snr_weights(alphas_cumprod: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Per-timestep weights of the epsilon loss: min(SNR_t, gamma) / SNR_t (Min-SNR-gamma, Hang et al.
    2023), SNR_t = a_t / (1 - a_t). Equals 1 where SNR_t <= gamma (the noisy steps, which lay out
    the scene) and damps the nearly clean steps; gamma None gives 1 everywhere (Ho et al.'s loss)."""
    if gamma is None:
        return torch.ones_like(alphas_cumprod)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return snr.clamp(max=gamma) / snr


def train_unet(latent_mean: torch.Tensor, latent_std: torch.Tensor, scaling_factor: float,
               scenes: Sequence[Scene], text_encoder: CLIPTextModel, steps: int, seed: int,
               batch_size: int = 64, lr: float = 1e-3, caption_dropout: float = 0.1, ema_decay: float = 0.999,
               cycles: Sequence[int] | None = None, restart_peak: float = 0.5, min_snr_gamma: float | None = 5.0,
               heads: int = 2, checkpoint: Path | None = None, checkpoint_every: int = 250,
               on_checkpoint: Callable[[UNet2DConditionModel, int], None] | None = None,
               log_every: int = 50) -> UNet2DConditionModel:
    """Epsilon-prediction training of the UNet on scaled VAE latents; returns the EMA UNet.

    Each step draws, per scene, one of the captions that describe it (or "" with probability
    `caption_dropout`), a timestep t ~ U{0..999}, noise eps, and regresses eps from
    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps. `checkpoint` (a file) makes the run resumable.
    Learning rate: `cosine_restarts_lr` with cycle lengths `cycles` (default: one cycle of `steps`).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    scheduler = sd_scheduler()
    captions, table, counts = caption_table(scenes)
    embeddings = encode_captions(text_encoder, captions)  # (C, 77, D), row 0 = ""
    unet = build_toy_unet(cross_attention_dim=embeddings.shape[-1], heads=heads)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    cycles = [max(1, c) for c in (cycles or [steps])]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_restarts_lr(s, cycles, restart_peak))
    loss_weights = min_snr_weights(scheduler.alphas_cumprod, min_snr_gamma)
    start = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(checkpoint, weights_only=True)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        generator.set_state(state["generator"])
        start = int(state["step"])
        sched.last_epoch = start  # the lr is a function of the step alone
        for group, base in zip(opt.param_groups, sched.base_lrs):
            group["lr"] = base * cosine_restarts_lr(start, cycles, restart_peak)
        sched._last_lr = [group["lr"] for group in opt.param_groups]
        print(f"[unet] resumed at step {start}", flush=True)
    unet.train()
    for step in range(start, steps):
        idx = torch.randint(len(scenes), (batch_size,), generator=generator)
        pick = (torch.rand(batch_size, generator=generator) * counts[idx]).long()
        caption_ids = table[idx, pick]
        caption_ids[torch.rand(batch_size, generator=generator) < caption_dropout] = 0
        posterior_noise = torch.randn(latent_mean[idx].shape, generator=generator)
        x0 = (latent_mean[idx] + latent_std[idx] * posterior_noise) * scaling_factor  # (B, 4, 8, 8)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        x_t = scheduler.add_noise(x0, noise, t)
        per_sample = (unet(x_t, t, encoder_hidden_states=embeddings[caption_ids]).sample - noise).pow(2).mean((1, 2, 3))
        loss = (per_sample * loss_weights[t]).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"[unet] step {step}/{steps} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e}", flush=True)
        done = step + 1
        if checkpoint is not None and (done % checkpoint_every == 0 or done == steps):
            torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "generator": generator.get_state(), "step": done},
                       checkpoint)
            if on_checkpoint is not None:
                on_checkpoint(ema, done)
    return ema.eval()


def toy_pipeline(vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 unet: UNet2DConditionModel) -> StableDiffusionPipeline:
    """The toy model as a real StableDiffusionPipeline (no safety checker)."""
    return assemble_pipeline(vae=vae, text_encoder=text_encoder, tokenizer=load_clip_tokenizer(), unet=unet,
                             scheduler=sd_scheduler())
