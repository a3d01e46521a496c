"""x_t for erasure: run the student's own DDIM chain from noise and stop early.

ESD and STEREO train on latents the *student* produces for the concept, not on noised data:
DDIM (50 steps, eta 0, CFG 3, conditioned on the concept) from pure noise for i ∈ [1, 49) steps.
After i steps the latent sits at `timesteps[i]` of the DDIM grid, and that is the timestep we
return. (The reference code uses 1000·i/50, one DDIM stride off from where the latent is.)

The chain is always DDIM, built from the model's scheduler *config* (its noise schedule,
prediction type and timestep spacing), whatever scheduler the model ships: SD 1.4 ships PNDM,
whose PLMS steps keep a history per batch, so stepping it would run a different sampler and
breaks once latents stop at different steps; SDXL ships Euler ("leading" spacing, steps_offset 1),
SD 2.x DDIM with v-prediction, which DDIM's step converts to eps and x0 itself. The UNet is called
through `stereo.conditioning.predict`, so SDXL's pooled text and size conditioning ride along.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, SchedulerMixin

from stereo.conditioning import predict


def ddim_scheduler(scheduler: SchedulerMixin) -> DDIMScheduler:
    """A fresh DDIM scheduler on `scheduler`'s noise schedule, without x0 clipping (ESD's sampler).

    Betas, `prediction_type`, `steps_offset` and `timestep_spacing` come from the config; PNDM-only
    keys are ignored. Fresh, so the caller's scheduler is never stepped and no state crosses calls.
    """
    return DDIMScheduler.from_config(scheduler.config, clip_sample=False)


def draw_stop_steps(batch_size: int, num_steps: int, generator: torch.Generator) -> torch.Tensor:
    """i ∈ [1, num_steps - 1) per latent, as in ESD/STEREO (at least one denoising step, never the last)."""
    high = max(num_steps - 1, 2)
    return torch.randint(1, high, (batch_size,), generator=generator, device=generator.device)


@torch.no_grad()
def sample_xt(
    unet,
    scheduler: SchedulerMixin,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    stop_steps: torch.Tensor,
    *,
    num_steps: int,
    guidance: float,
    latent_shape: tuple[int, int, int],
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents after `stop_steps[b]` DDIM steps and the timestep each one truly sits at.

    cond: (B, L, D) conditions (`stereo.conditioning`), uncond: (L, D) or (1, L, D); stop_steps: (B,) ints.
    Runs one batched chain to max(stop_steps); a latent stops moving once its own count is reached.
    `scheduler` only lends its config (see `ddim_scheduler`). Returns x_t (B, 4, h, w) and t (B,) on the DDIM grid.
    """
    scheduler = ddim_scheduler(scheduler)
    scheduler.set_timesteps(num_steps, device=cond.device)
    timesteps = scheduler.timesteps  # (num_steps,) descending
    batch = cond.shape[0]
    dtype = next(unet.parameters()).dtype
    x = torch.randn((batch, *latent_shape), generator=generator, device=generator.device)
    x = (x * scheduler.init_noise_sigma).to(cond.device)
    uncond = uncond.reshape(1, *uncond.shape[-2:]).expand(batch, -1, -1)
    stop_steps = stop_steps.to(cond.device)
    for k in range(int(stop_steps.max())):
        active = stop_steps > k  # (B,)
        xa, t = x[active], timesteps[k]
        n = xa.shape[0]
        pair = torch.cat([uncond[active], cond[active]]).to(dtype)  # (2n, L, D)
        out = predict(unet, torch.cat([xa, xa]).to(dtype), t, pair).float()
        out_uncond, out_cond = out[:n], out[n:]
        out = out_uncond + guidance * (out_cond - out_uncond)  # (n, 4, h, w) classifier-free guidance
        x[active] = scheduler.step(out, t, xa).prev_sample  # reads out as the model's prediction_type
    return x, timesteps[stop_steps]
