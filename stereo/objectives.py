"""The STEREO maths: every regression target and loss of the method, one function each.

Notation (STEREO.md): eps_0 is the frozen teacher UNet, eps_theta the student, ∅ the empty
prompt. Teacher predictions are computed under `torch.no_grad()` by the caller, so targets
carry no gradient. Shapes: B latents of SD's (4, h, w).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def esd_target(eps_uncond: torch.Tensor, eps_concept: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD (Gandikota et al. 2023, Eq. 7): eps* = eps_0(x_t, ∅) - eta (eps_0(x_t, c) - eps_0(x_t, ∅)).

    eta = 1 is standard ESD; eta = 0 (the STEREO reference code's "negative guidance" g = 2)
    regresses the concept onto the unconditional prediction.
    """
    return eps_uncond - eta * (eps_concept - eps_uncond)  # (B, 4, h, w)


def reo_target(
    eps_uncond: torch.Tensor, eps_anchors: torch.Tensor, eps_negatives: torch.Tensor, eta_a: float, eta_n: float
) -> torch.Tensor:
    """REO's compositional target (STEREO, Srivatsan et al. 2025, Sec. 3.3):

        eps* = eps_0(∅) + eta_a mean_a (eps_0(a) - eps_0(∅)) - eta_n mean_n (eps_0(n) - eps_0(∅))

    eps_uncond: (B, 4, h, w); eps_anchors: (A, B, 4, h, w), the A anchors drawn for each latent;
    eps_negatives: (N, B, 4, h, w), every negative (concept + adversarial embeddings).
    Anchors pull the prediction toward benign context, negatives push it away from the concept.
    """
    anchor_direction = (eps_anchors - eps_uncond).mean(dim=0)  # (B, 4, h, w)
    negative_direction = (eps_negatives - eps_uncond).mean(dim=0)  # (B, 4, h, w)
    return eps_uncond + eta_a * anchor_direction - eta_n * negative_direction


def erasure_loss(eps_student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE(eps_theta(x_t, c, t), eps*) — the loss of ESD and REO alike, computed in fp32."""
    return F.mse_loss(eps_student.float(), target.float())


def denoising_loss(eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Textual inversion's plain denoising loss MSE(eps_theta(x_t, c_token, t), noise) (Gal et al. 2023)."""
    return F.mse_loss(eps_pred.float(), noise.float())
