"""One step of each evaluation workload traced: the token attacks (concept inversion, soft prompt),
UnlearnDiffAtk, Ring-A-Bell's fitness, and generation (CFG UNet step, VAE decode)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from benchmarks.memory.configs import Setup
from benchmarks.memory.trace import TEXT_LEN, Adam, Trace, timesteps
from stereo.attacks.unlearndiffatk import project_to_simplex, soft_prefix


def trace_token_attack(setup: Setup, batch: int, *, checkpointing: bool, adamw: bool) -> tuple[dict, dict]:
    """A concept-inversion (AdamW) or soft-prompt (PGD) step: gradients through the frozen UNet and text
    encoder into one token's fp32 vectors, under bf16 autocast; the base pipeline's UNet is attacked."""
    with Trace(setup) as tr:
        text_encoder, _, unet = tr.pipeline()
        if checkpointing:
            unet.enable_gradient_checkpointing(gradient_checkpointing_func=tr.cuda.checkpoint)
        width = text_encoder.config.hidden_size
        vectors = torch.zeros(1, width, requires_grad=True)
        optimizer = Adam([vectors]) if adamw else None
        gallery = tr.latents(setup.gallery_size)
        tr.tracker.reset_peak()
        with tr.tracker.section("attack step"):
            ids = torch.zeros(batch, TEXT_LEN, dtype=torch.long)
            noise = torch.randn(batch, *gallery.shape[1:])
            x_t = gallery[:batch] * 0.5 + noise * 0.5
            with tr.cuda.autocast(), _injected(text_encoder, ids == 1, vectors):
                cond = text_encoder(ids)[0]
                eps = unet(x_t.to(setup.frozen), timesteps(batch), encoder_hidden_states=cond.to(setup.frozen)).sample
            loss = F.mse_loss(eps.float(), noise.float())
            loss.backward()
            del eps, loss, cond
            _token_update(vectors, optimizer)
        return {"attack step": tr.breakdown("attack step")}, dict(tr.resident)


def _token_update(vectors: torch.Tensor, optimizer) -> None:
    if optimizer is not None:
        optimizer.step("foreach")  # torch.optim.AdamW's default on CUDA
        optimizer.zero_grad()
        return
    with torch.no_grad():  # PGD: signed step, projection onto the L∞ ball
        vectors -= 1e-3 * vectors.grad.sign()
        vectors.copy_(vectors.clamp(-0.1, 0.1))
        vectors.grad = None


@contextlib.contextmanager
def _injected(text_encoder, mask: torch.Tensor, vectors: torch.Tensor):
    """The token's vectors in place of its embedding rows (one new (B, 77, D) tensor, as the real hook)."""
    def hook(module, inputs, output):
        return torch.where(mask[..., None], vectors[0].to(output.dtype), output)

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def trace_unlearndiffatk(setup: Setup) -> tuple[dict, dict]:
    """One UnlearnDiffAtk step: prompt_batch prompts × k relaxed one-hot slots over the vocabulary."""
    p, k = setup.uda_prompt_batch, setup.uda_prefix_tokens
    with Trace(setup) as tr:
        text_encoder, _, unet = tr.pipeline()
        table_rows = text_encoder.get_input_embeddings().weight
        vocab = table_rows.shape[0]
        weights = torch.zeros(p, k, vocab, requires_grad=True)
        optimizer = Adam([weights], decoupled_weight_decay=False)
        gallery = tr.latents(32)
        tr.tracker.reset_peak()
        with tr.tracker.section("attack step"):
            table = table_rows.detach()[torch.arange(vocab)].float()  # (V, D)
            ids = torch.zeros(p, TEXT_LEN, dtype=torch.long)
            noise = torch.randn(p, *gallery.shape[1:])
            x_t = gallery[:p] * 0.5 + noise * 0.5
            with tr.cuda.autocast():
                prefix = weights @ table  # (P, k, D)
                with soft_prefix(text_encoder, prefix):
                    cond = text_encoder(ids)[0]
                eps = unet(x_t.to(setup.frozen), timesteps(p), encoder_hidden_states=cond.to(setup.frozen)).sample
            loss = F.mse_loss(eps.float(), noise.float())
            optimizer.zero_grad()
            loss.backward()
            del eps, loss, cond, prefix
            optimizer.step("foreach")
            with torch.no_grad():
                weights.copy_(project_to_simplex(weights))
            del table
        return {"attack step": tr.breakdown("attack step")}, dict(tr.resident)


def trace_ring_a_bell(setup: Setup, encode_batch: int = 256) -> tuple[dict, dict]:
    """One Ring-A-Bell generation: the population's hard prompts through the base text encoder, no grad."""
    with Trace(setup) as tr:
        text_encoder, _, _ = tr.pipeline()
        width = text_encoder.config.hidden_size
        count = setup.rab_population * setup.rab_prompt_batch
        tr.tracker.reset_peak()
        with tr.tracker.section("fitness"), torch.no_grad():
            goals = torch.randn(setup.rab_prompt_batch, TEXT_LEN, width)
            ids = torch.zeros(count, TEXT_LEN, dtype=torch.long)
            states = torch.cat([text_encoder(ids[i:i + encode_batch])[0].float()
                                for i in range(0, count, encode_batch)])
            states = states.view(setup.rab_prompt_batch, setup.rab_population, TEXT_LEN, width)
            distance = (states - goals[:, None]).pow(2).mean(dim=(2, 3))
            del states, distance
        return {"fitness": tr.breakdown("fitness")}, dict(tr.resident)


def trace_generation(setup: Setup) -> tuple[dict, dict]:
    """Evaluation generation: CFG UNet steps on 2×batch latents, then the VAE decode of batch images."""
    n = setup.generation_batch
    with Trace(setup) as tr:
        text_encoder, vae, unet = tr.pipeline()
        tr.tracker.reset_peak()
        with torch.no_grad():
            with tr.tracker.section("text encoder"):
                cond = text_encoder(torch.zeros(2 * n, TEXT_LEN, dtype=torch.long))[0]
            with tr.tracker.section("UNet step (CFG)"):
                latents = tr.latents(n, setup.frozen)
                eps = unet(torch.cat([latents, latents]), timesteps(2 * n), encoder_hidden_states=cond).sample
                eps_uncond, eps_cond = eps.chunk(2)
                latents = latents - 0.1 * (eps_uncond + 7.5 * (eps_cond - eps_uncond))
                del eps, eps_uncond, eps_cond
            with tr.tracker.section("VAE decode"):
                image = vae.decode(latents / vae.config.scaling_factor).sample
                image = (image / 2 + 0.5).clamp(0, 1)
                del image
        return {k: tr.breakdown(k) for k in tr.tracker.sections}, dict(tr.resident)
