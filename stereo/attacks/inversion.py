"""Learning token embeddings that revive a concept in a (possibly erased) model.

Concept inversion (Pham et al. 2023, "Circumventing Concept Erasure"): textual inversion
(Gal et al. 2023) against the erased UNet. A new token, initialised from a related word, is the
only thing that trains; the loss is the plain denoising loss on images of the concept made by
the ORIGINAL model:   min_v  E_{x0, eps, t} || eps_theta(x_t, c(template(v)), t) - eps ||^2
(`denoising_loss`, also UnlearnDiffAtk's objective).

`method="pgd"` is the soft-prompt variant (AdvUnlearn style): signed-gradient steps on the
same loss, projected onto an L∞ ball of radius `pgd_eps` around the initial vectors.

The learned vectors are injected with a forward hook on the token-embedding table, so every
other row of the table stays bit-identical and only the new vectors receive gradients.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from stereo.attacks.precision import Precision
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


@dataclass
class LearnedToken:
    """A learned embedding: `token` (as typed in prompts) and its (n, D) vectors."""

    token: str
    vectors: torch.Tensor
    losses: list[float] = field(default_factory=list)


def templates_for(kind: str, custom=None) -> tuple[str, ...]:
    if custom:
        return tuple(custom)
    if kind not in TEMPLATES:
        raise ValueError(f"no inversion templates for concept kind {kind!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[kind]


def initial_vectors(pipe, initializer: str, num_vectors: int) -> torch.Tensor:
    """(n, D) copies of the mean input embedding of `initializer`'s BPE pieces."""
    ids = pipe.tokenizer(initializer, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"initializer word {initializer!r} tokenizes to nothing")
    table = pipe.text_encoder.get_input_embeddings().weight
    return table[ids].detach().float().mean(0, keepdim=True).repeat(num_vectors, 1)


def add_token(pipe, learned: LearnedToken) -> list[int]:
    """Register the token in the pipeline's tokenizer and text encoder, as `load_textual_inversion` does."""
    vectors = learned.vectors.to(pipe.text_encoder.device, pipe.text_encoder.dtype)
    pipe.load_textual_inversion({learned.token: vectors}, token=learned.token)
    return token_ids(pipe, learned.token, vectors.shape[0])


def token_ids(pipe, token: str, num_vectors: int) -> list[int]:
    names = [token] + [f"{token}_{i}" for i in range(1, num_vectors)]  # diffusers' multi-vector naming
    return pipe.tokenizer.convert_tokens_to_ids(names)


def write_token_rows(pipe, ids: list[int], vectors: torch.Tensor) -> None:
    """Rows `ids` of the text encoder's token-embedding table become `vectors` (n, D), in the table's dtype."""
    with torch.no_grad():
        table = pipe.text_encoder.get_input_embeddings().weight
        table[ids] = vectors.to(table.device, table.dtype)


def install_token(pipe, learned: LearnedToken) -> None:
    """Put a learned token in the pipeline, or overwrite its vectors if the pipeline has it already."""
    if learned.token not in pipe.tokenizer.get_vocab():
        add_token(pipe, learned)
        return
    write_token_rows(pipe, token_ids(pipe, learned.token, learned.vectors.shape[0]), learned.vectors)


@contextlib.contextmanager
def injected(pipe, ids: list[int], vectors: torch.Tensor, precision: Precision | None = None):
    """While active, rows `ids` of the token-embedding lookup are replaced by `vectors` (with gradient).

    Under a `precision` that autocasts, the looked-up embeddings become fp32, so the gradient reaching
    the vectors is never held in half precision.
    """
    ids_t = torch.tensor(ids, device=pipe.text_encoder.device)

    def hook(module, inputs, output):
        out = (precision.input(output) if precision else output).clone()
        for j, token_id in enumerate(ids_t):
            out[inputs[0] == token_id] = vectors[j].to(out.dtype)
        return out

    handle = pipe.text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def denoising_loss(eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Textual inversion's plain denoising loss (Gal et al. 2023), in fp32 whatever the UNet's dtype:

        L = mean || eps_theta(x_t, c, t) - eps ||^2     over the batch and every latent element,

    `eps_pred` the UNet's prediction and `noise` the eps that made x_t, both (B, 4, h, w).
    """
    return F.mse_loss(eps_pred.float(), noise.float())


def random_start(pipe, initializer: str, settings: InversionSettings) -> torch.Tensor:
    """(n, D) a random start for a restart, drawn from `settings.seed`: textual inversion starts from the
    initializer's vectors plus Gaussian noise with the token table's per-coordinate std; PGD from a uniform
    random point of its L∞ ball (Madry et al.'s random start; the ball stays centred on the initializer)."""
    init = initial_vectors(pipe, initializer, settings.num_vectors).cpu()
    generator = torch.Generator().manual_seed(settings.seed)
    if settings.method == "pgd":
        return init + (2 * torch.rand(init.shape, generator=generator) - 1) * settings.pgd_eps
    spread = pipe.text_encoder.get_input_embeddings().weight.detach().float().std().cpu()
    return init + spread * torch.randn(init.shape, generator=generator)


def learn_token(pipe, latents: torch.Tensor, token: str, initializer: str, settings: InversionSettings,
                progress: bool = True, accelerator=None, start: torch.Tensor | None = None) -> LearnedToken:
    """Learn `token` against `pipe.unet` on `latents` (N, 4, h, w) of concept images; returns its vectors.

    The token is added to the pipeline (tokenizer + text encoder) and left there with the learned
    vectors written into its rows, so `stereo.generation.encode_prompts(pipe, ["a photo of " + token])` uses it.

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
    ids = add_token(pipe, LearnedToken(token, init))
    device = pipe.unet.device
    vectors = (init if start is None else start.float()).clone().to(device).requires_grad_(True)  # (n, D) fp32
    optimizer = torch.optim.AdamW([vectors], lr=settings.lr, weight_decay=0.0) if settings.method == "ti" else None
    generator = torch.Generator().manual_seed(process_seed(settings.seed, accelerator))
    unet_was_training = pipe.unet.training
    pipe.unet.eval().requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
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
    learned = LearnedToken(token, vectors.detach().cpu(), losses)
    write_token_rows(pipe, ids, learned.vectors)
    return learned


def _inversion_loss(pipe, ids: list[int], vectors: torch.Tensor, token: str, latents: torch.Tensor,
                    settings: InversionSettings, generator: torch.Generator) -> torch.Tensor:
    """The fp32 denoising loss of one batch: random latents, noise, timesteps and templates."""
    device = pipe.unet.device
    pick = torch.randint(len(latents), (settings.batch_size,), generator=generator)
    noise = torch.randn(latents[pick].shape, generator=generator).to(device)
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (settings.batch_size,), generator=generator)
    x_t = pipe.scheduler.add_noise(latents[pick], noise, t.to(device))  # (B, 4, h, w)
    templates = [settings.templates[int(i)] for i in torch.randint(len(settings.templates),
                                                                   (settings.batch_size,), generator=generator)]
    text, unet = Precision.of(pipe.text_encoder), Precision.of(pipe.unet)
    with text.context(), injected(pipe, ids, vectors, text):
        cond = encode_prompts(pipe, [tpl.format(token) for tpl in templates])
    with unet.context():
        eps = pipe.unet(unet.input(x_t), t.to(device), encoder_hidden_states=unet.input(cond)).sample
    return denoising_loss(eps, noise)


def _update(vectors, optimizer, settings: InversionSettings, init: torch.Tensor) -> None:
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return
    with torch.no_grad():  # PGD: signed gradient step, then project onto the L∞ ball around init
        vectors -= settings.lr * vectors.grad.sign()
        vectors.copy_(init + (vectors - init).clamp(-settings.pgd_eps, settings.pgd_eps))
        vectors.grad = None


def save_token(learned: LearnedToken, path: str | Path) -> Path:
    """A diffusers textual-inversion file: `pipe.load_textual_inversion(path)` adds the token."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({learned.token: learned.vectors.float().contiguous()}, str(path),
              metadata={"format": "diffusers-textual-inversion"})
    return path


def load_token(path: str | Path) -> LearnedToken:
    state = load_file(str(path))
    if len(state) != 1:
        raise ValueError(f"{path} holds {len(state)} tensors; a textual-inversion file holds one (token -> vectors)")
    token, vectors = next(iter(state.items()))
    return LearnedToken(token, vectors if vectors.ndim == 2 else vectors[None])
