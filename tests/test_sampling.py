"""The x_t sampler: ESD's DDIM chain (eta 0) on the model's noise schedule, whatever scheduler the model ships,
stopped per latent, returning the timestep its latent actually sits at (not the reference's 1000·i/50)."""

import pytest
import torch
from diffusers import PNDMScheduler
from torch import nn

from stereo.erasure.sampling import ddim_scheduler, draw_stop_steps, sample_xt
from stereo.models.rehearsal import SD14_SCHEDULER_CONFIG, sd14_scheduler
from stereo.models.tiny import sd_scheduler

SCHEDULERS = {"ddim": sd_scheduler, "sd14_pndm": sd14_scheduler}  # tiny/toy models ship DDIM, SD 1.4 PNDM


class Out:
    def __init__(self, sample):
        self.sample = sample


class OracleUNet(nn.Module):
    """Predicts the exact noise of x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps for a fixed x0.

    DDIM with this oracle keeps eps fixed, so after i steps the latent must equal
    add_noise(x0, eps, timesteps[i]) exactly — which pins down the latent's true timestep.
    """

    def __init__(self, x0, alphas_cumprod):
        super().__init__()
        self.x0, self.ab = x0, alphas_cumprod
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x, t, encoder_hidden_states):
        ab = self.ab[t].view(-1, 1, 1, 1) if torch.is_tensor(t) and t.ndim else self.ab[int(t)]
        x0 = self.x0[:1]  # one clean image shared by every latent
        return Out((x - ab.sqrt() * x0) / (1 - ab).sqrt())


class TextAndTimeUNet(nn.Module):
    """eps = (0.5 + t/1000) x + mean(text): per latent, and it depends on t and the prompt, so a chain that
    mixes latents, skips or repeats a timestep, or uses a multistep (PLMS) update gives different latents."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x, t, encoder_hidden_states):
        text = encoder_hidden_states.float().mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return Out((0.5 + t.float() / 1000) * x + text + self.dummy)


def ddim_chain_one_latent(unet, alphas_cumprod, noise, cond, uncond, steps, guidance):
    """The documented chain written out: DDIM 50 (eta 0, grid 981, 961, ..., 1), CFG, one latent at a time."""
    grid = torch.arange(50).flip(0) * 20 + 1
    x = noise[None]
    for k in range(steps):
        t, t_prev = grid[k], grid[k + 1]
        eps_u, eps_c = unet(x, t, uncond[None]).sample, unet(x, t, cond[None]).sample
        eps = eps_u + guidance * (eps_c - eps_u)
        ab, ab_prev = alphas_cumprod[t], alphas_cumprod[t_prev]
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    return x[0], grid[steps]


@pytest.mark.parametrize("make_scheduler", SCHEDULERS.values(), ids=SCHEDULERS.keys())
def test_returned_timestep_matches_the_latent(make_scheduler):
    scheduler = make_scheduler()
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).repeat(3, 1, 1, 1)
    unet = OracleUNet(x0, scheduler.alphas_cumprod)
    stop = torch.tensor([1, 7, 30])
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    x_t, t = sample_xt(unet, scheduler, torch.zeros(3, 77, 8), torch.zeros(77, 8), stop,
                       num_steps=50, guidance=3.0, latent_shape=(4, 8, 8), generator=gen)
    ab_T = scheduler.alphas_cumprod[981]
    eps = (noise - ab_T.sqrt() * x0) / (1 - ab_T).sqrt()
    grid = torch.arange(50).flip(0) * 20 + 1  # DDIM 50-step grid: 981, 961, ..., 1
    assert t.tolist() == grid[stop].tolist()
    for b in range(3):
        expected = scheduler.add_noise(x0[b:b + 1], eps[b:b + 1], t[b:b + 1])
        torch.testing.assert_close(x_t[b:b + 1], expected, atol=1e-4, rtol=1e-4)
        # the reference code's timestep 1000*i/50 describes a different (wrong) noise level
        wrong = torch.tensor([1000 * int(stop[b]) // 50])
        assert not torch.allclose(x_t[b:b + 1], scheduler.add_noise(x0[b:b + 1], eps[b:b + 1], wrong), atol=1e-3)


@pytest.mark.parametrize("stop", [[3], [1, 5, 2, 9]], ids=["batch1", "batch4"])
def test_sd14_pndm_scheduler_gives_the_ddim_chain_and_stays_untouched(stop):
    """SD 1.4 ships PNDM: batch 4 with different stop steps must run (PNDM's per-batch state crashed it), and
    batch 1 must be DDIM, not PLMS. The pipeline's own scheduler is never stepped."""
    scheduler, unet = sd14_scheduler(), TextAndTimeUNet()
    stop = torch.tensor(stop)
    cond = torch.randn(len(stop), 77, 8, generator=torch.Generator().manual_seed(2))
    uncond = torch.randn(77, 8, generator=torch.Generator().manual_seed(3))
    x_t, t = sample_xt(unet, scheduler, cond, uncond, stop, num_steps=50, guidance=3.0,
                       latent_shape=(4, 8, 8), generator=torch.Generator().manual_seed(4))
    noise = torch.randn((len(stop), 4, 8, 8), generator=torch.Generator().manual_seed(4))
    for b, steps in enumerate(stop.tolist()):
        expected, t_expected = ddim_chain_one_latent(unet, scheduler.alphas_cumprod, noise[b], cond[b], uncond,
                                                     steps, guidance=3.0)
        torch.testing.assert_close(x_t[b], expected, atol=1e-5, rtol=1e-5)
        assert int(t[b]) == int(t_expected)
    assert scheduler.num_inference_steps is None and scheduler.counter == 0 and not scheduler.ets


def test_ddim_scheduler_keeps_the_models_noise_schedule_and_prediction_type():
    config = {**SD14_SCHEDULER_CONFIG, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
              "clip_sample": True}
    ddim = ddim_scheduler(PNDMScheduler.from_config(config))
    for key in ("beta_start", "beta_end", "beta_schedule", "steps_offset", "prediction_type", "timestep_spacing",
                "set_alpha_to_one"):
        assert ddim.config[key] == config[key], key
    assert ddim.config.clip_sample is False  # ESD's DDIM does not clip x0
    ddim.set_timesteps(50)
    assert ddim.timesteps[0] == 999 and ddim.timesteps[-1] == 19  # trailing spacing, as configured


def test_stop_steps_in_range():
    s = draw_stop_steps(1000, 50, torch.Generator().manual_seed(0))
    assert s.min() >= 1 and s.max() <= 48
