"""Learning token embeddings that revive a concept in a (possibly erased) model.

Concept inversion (Pham et al. 2023, "Circumventing Concept Erasure"): textual inversion
(Gal et al. 2023) against the erased UNet. A new token, initialised from a related word, is the
only thing that trains; the loss is the plain denoising loss on images of the concept made by
the ORIGINAL model:   min_v  E_{x0, eps, t} || f_theta(x_t, c(template(v)), t) - target ||^2
(`denoising_loss`, also UnlearnDiffAtk's objective), with target = eps, or v on a v-prediction
model (SD 2.1: `stereo.conditioning.denoising_target`).

Every family: the token lives in each text tower of `stereo.conditioning.text_towers` (one for SD
1.x / 2.x, two for SDXL). Its vectors are (n, d1 + d2) on SDXL: tower i reads its slice, both slices
train together, and the file is the one diffusers' SDXL examples load tower by tower
({"clip_l": (n, d1), "clip_g": (n, d2)}, the token's name in the file's metadata).

`method="pgd"` is the soft-prompt variant (AdvUnlearn style): signed-gradient steps on the
same loss, projected onto an L∞ ball of radius `pgd_eps` around the initial vectors.

The learned vectors are injected with a forward hook on the token-embedding table, so every
other row of the table stays bit-identical and only the new vectors receive gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stereo.attacks.learned_token import (
    LearnedToken,
    add_token,
    injected,
    token_widths,
    tower_widths,
    write_token_rows,
)
from stereo.attacks.precision import Precision
from stereo.conditioning import denoising_target, predict, text_towers
from stereo.config import InversionConfig, InversionMethod
from stereo.generation import encode_prompts
from stereo.parallel import mean_over_processes, process_seed

OBJECT_TEMPLATES = ("a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "a close-up photo of a {}",
                    "a bright photo of a {}", "a photo of one {}", "a good photo of a {}")
STYLE_TEMPLATES = ("a painting in the style of {}", "a rendering in the style of {}", "an artwork in the style of {}",
                   "a picture in the style of {}", "a drawing in the style of {}")
NUDITY_TEMPLATES = ("a photo of {}", "an image of {}", "a picture of {}")
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES, "nudity": NUDITY_TEMPLATES}


@dataclass
class InversionSettings(InversionConfig):
    """One inversion's budget: STE's `InversionConfig` (its defaults) with the templates resolved and a seed."""

    templates: tuple[str, ...] = OBJECT_TEMPLATES  # the prompts the token is learned in, "{}" = the token
    seed: int = 0


def templates_for(kind: str, custom=None) -> tuple[str, ...]:
    if custom:
        return tuple(custom)
    if kind not in TEMPLATES:
        raise ValueError(f"no inversion templates for concept kind {kind!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[kind]


def initial_vectors(pipe, initializer: str, num_vectors: int) -> torch.Tensor:
    """(n, D) copies of the mean input embedding of `initializer`'s BPE pieces (SDXL: each tower's, side by side)."""
    means = []
    for tokenizer, encoder in text_towers(pipe):
        ids = tokenizer(initializer, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"initializer word {initializer!r} tokenizes to nothing")
        table = encoder.get_input_embeddings().weight
        means.append(table[ids].detach().float().mean(0, keepdim=True).repeat(num_vectors, 1))
    return torch.cat(means, dim=-1)


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Textual inversion's plain denoising loss (Gal et al. 2023), in fp32 whatever the UNet's dtype:

        L = mean || f_theta(x_t, c, t) - target ||^2     over the batch and every latent element,

    `prediction` the UNet's output and `target` what it should be (`denoising_batch`: eps, or v on a
    v-prediction model), both (B, 4, h, w).
    """
    return F.mse_loss(prediction.float(), target.float())


def noisy_latents(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (DDPM's forward process, a_t = alphas_cumprod[t]): the UNet's input.

    DDPM, DDIM and PNDM (SD 1.x / 2.x) compute exactly this in `add_noise`. Sigma-parameterised schedulers
    (Euler, SDXL's) return x0 + sigma eps there, the sampler's own scale, and only for timesteps of their
    current schedule; for them the same formula is written out, so the UNet sees what it was trained on.
    """
    if not hasattr(scheduler, "sigmas"):
        return scheduler.add_noise(latents, noise, t)
    alpha_bar = scheduler.alphas_cumprod.to(latents.device)[t.to(latents.device)].float()
    alpha_bar = alpha_bar.view(-1, *[1] * (latents.ndim - 1))  # (B, 1, 1, 1)
    return (alpha_bar.sqrt() * latents.float() + (1 - alpha_bar).sqrt() * noise.float()).to(latents.dtype)


def denoising_batch(scheduler, latents: torch.Tensor, size: int, generator: torch.Generator):
    """One batch of the denoising loss: `size` random latents of `latents` (N, 4, h, w), noise, timesteps.

    Returns x_t (B, 4, h, w), t (B,) and the target the model predicts (eps, v or x0 by its prediction_type).
    """
    device = latents.device
    pick = torch.randint(len(latents), (size,), generator=generator)
    noise = torch.randn(latents[pick].shape, generator=generator).to(device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (size,), generator=generator).to(device)
    x_t = noisy_latents(scheduler, latents[pick], noise, t)  # (B, 4, h, w)
    return x_t, t, denoising_target(scheduler, latents[pick], noise, t)


def random_start(pipe, initializer: str, settings: InversionSettings) -> torch.Tensor:
    """(n, D) a random start for a restart, drawn from `settings.seed`: textual inversion starts from the
    initializer's vectors plus Gaussian noise with the token table's per-coordinate std (SDXL: each tower's
    std on its slice); PGD from a uniform random point of its L∞ ball (Madry et al.'s random start; the
    ball stays centred on the initializer)."""
    init = initial_vectors(pipe, initializer, settings.num_vectors).cpu()
    generator = torch.Generator().manual_seed(settings.seed)
    if settings.method == "pgd":
        return init + (2 * torch.rand(init.shape, generator=generator) - 1) * settings.pgd_eps
    spreads = [encoder.get_input_embeddings().weight.detach().float().std().cpu() for _, encoder in text_towers(pipe)]
    spread = spreads[0] if len(spreads) == 1 else torch.cat(
        [s.expand(w) for s, w in zip(spreads, tower_widths(pipe))])  # (D,)
    return init + spread * torch.randn(init.shape, generator=generator)


def learn_token(pipe, latents: torch.Tensor, token: str, initializer: str, settings: InversionSettings,
                progress: bool = True, accelerator=None, start: torch.Tensor | None = None) -> LearnedToken:
    """Learn `token` against `pipe.unet` on `latents` (N, 4, h, w) of concept images; returns its vectors.

    The token is added to the pipeline (each tower's tokenizer + text encoder) and left there with the
    learned vectors written into its rows, so `stereo.generation.encode_prompts(pipe, ["a photo of " + token])`
    uses it. On SDXL both towers' vectors train together, as one (n, d1 + d2) variable.

    With an `accelerator` of several processes the inversion is data-parallel: every process must
    call this, each draws its own batches (its own random stream) and the vectors' gradient is
    averaged over processes before every update, so all processes hold the same vectors at every
    step, and an update sees `batch_size` x processes latents. `losses` are the process means.
    The vectors train in fp32 whatever the pipeline's dtype (`stereo.attacks.precision`).
    `start` (n, D): where the vectors start (an attack's random restart); None: at the initializer's
    vectors. PGD's L∞ ball stays centred on the initializer's vectors either way.
    """
    methods = [m.value for m in InversionMethod]  # ti: AdamW (textual inversion); pgd: signed steps in an L∞ ball
    if settings.method not in methods:
        raise ValueError(f"inversion method {settings.method!r} is not valid; choose one of {', '.join(methods)}")
    init = initial_vectors(pipe, initializer, settings.num_vectors)
    widths = token_widths(pipe)
    ids = add_token(pipe, LearnedToken(token, init, widths=widths))
    device = pipe.unet.device
    vectors = (init if start is None else start.float()).clone().to(device).requires_grad_(True)  # (n, D) fp32
    optimizer = torch.optim.AdamW([vectors], lr=settings.lr, weight_decay=0.0) if settings.method == "ti" else None
    generator = torch.Generator().manual_seed(process_seed(settings.seed, accelerator))
    unet_was_training = pipe.unet.training
    pipe.unet.eval().requires_grad_(False)
    for _, encoder in text_towers(pipe):
        encoder.requires_grad_(False)
    latents = latents.to(device)
    losses: list[float] = []
    bar = tqdm(range(settings.steps), desc=f"invert {token}", disable=not progress, leave=False)
    for _ in bar:
        loss = _inversion_loss(pipe, ids, vectors, token, latents, settings, generator)
        loss.backward()
        mean_over_processes(vectors.grad, accelerator)
        _update(vectors, optimizer, settings, init.to(device))
        losses.append(float(mean_over_processes(loss.detach().clone(), accelerator)))
        bar.set_postfix(loss=f"{losses[-1]:.4g}")
    pipe.unet.train(unet_was_training)
    learned = LearnedToken(token, vectors.detach().cpu(), losses, widths)
    write_token_rows(pipe, ids, learned.vectors)
    return learned


def _inversion_loss(pipe, ids: list[list[int]], vectors: torch.Tensor, token: str, latents: torch.Tensor,
                    settings: InversionSettings, generator: torch.Generator) -> torch.Tensor:
    """The fp32 denoising loss of one batch: random latents, noise, timesteps and templates."""
    x_t, t, target = denoising_batch(pipe.scheduler, latents, settings.batch_size, generator)
    templates = [settings.templates[int(i)] for i in torch.randint(len(settings.templates),
                                                                   (settings.batch_size,), generator=generator)]
    text, unet = Precision.of(pipe.text_encoder), Precision.of(pipe.unet)
    with text.context(), injected(pipe, ids, vectors, text):
        cond = encode_prompts(pipe, [tpl.format(token) for tpl in templates])
    with unet.context():
        prediction = predict(pipe.unet, unet.input(x_t), t, unet.input(cond))
    return denoising_loss(prediction, target)


def _update(vectors, optimizer, settings: InversionSettings, init: torch.Tensor) -> None:
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return
    with torch.no_grad():  # PGD: signed gradient step, then project onto the L∞ ball around init
        vectors -= settings.lr * vectors.grad.sign()
        vectors.copy_(init + (vectors - init).clamp(-settings.pgd_eps, settings.pgd_eps))
        vectors.grad = None


