"""The x_t sampler returns the timestep its latent actually sits at (not the reference's 1000·i/50)."""

import torch
from torch import nn

from stereo.erasure.sampling import draw_stop_steps, sample_xt
from stereo.models.tiny import sd_scheduler


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
        return type("Out", (), {"sample": (x - ab.sqrt() * x0) / (1 - ab).sqrt()})()


def test_returned_timestep_matches_the_latent():
    scheduler = sd_scheduler()
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


def test_stop_steps_in_range():
    s = draw_stop_steps(1000, 50, torch.Generator().manual_seed(0))
    assert s.min() >= 1 and s.max() <= 48
