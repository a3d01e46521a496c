"""x_t for erasure: run the student's own DDIM chain from noise and stop early.

ESD and STEREO train on latents the *student* produces for the concept, not on noised data:
DDIM (50 steps, CFG 3, conditioned on the concept) from pure noise for i ∈ [1, 49) steps.
After i steps the latent sits at `timesteps[i]` of the DDIM grid, and that is the timestep we
return. (The reference code uses 1000·i/50, one DDIM stride off from where the latent is.)
"""

from __future__ import annotations

import copy

import torch
from diffusers import SchedulerMixin


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

    cond: (B, L, D) text embeddings, uncond: (L, D) or (1, L, D); stop_steps: (B,) ints.
    Runs one batched chain to max(stop_steps); a latent stops moving once its own count is reached.
    Returns x_t (B, 4, h, w) and t (B,) on the DDIM grid.
    """
    scheduler = copy.deepcopy(scheduler)  # set_timesteps mutates; keep the caller's untouched
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
        eps = unet(
            torch.cat([xa, xa]).to(dtype), t, encoder_hidden_states=torch.cat([uncond[active], cond[active]]).to(dtype)
        ).sample.float()
        eps_uncond, eps_cond = eps[:n], eps[n:]
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)  # (n, 4, h, w) classifier-free guidance
        x[active] = scheduler.step(eps, t, xa).prev_sample
    return x, timesteps[stop_steps]
