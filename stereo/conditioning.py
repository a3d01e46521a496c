"""Text conditions and UNet calls for every model family: SD 1.x, SD 2.x (epsilon or v-prediction), SDXL.

Everything in this package that runs a UNet (trainer student and teacher, the x_t sampler, attacks,
generation) goes through `predict`, and every prompt becomes a condition through `encode_tokens`.

One condition is ONE tensor per prompt, whatever the family:
  SD 1.x / 2.x: (K, 77, D), the text encoder's last hidden state, as `StableDiffusionPipeline` feeds it.
  SDXL:         (K, 78, D) with D = d1 + d2 (768 + 1280). Rows 0..76 are both towers' PENULTIMATE hidden
                states side by side (`StableDiffusionXLPipeline.encode_prompt`); row 77 is the "packed
                pooled row": tower 2's projected pooled embedding (`text_embeds`, d_pool = 1280 wide) in its
                first d_pool entries, zeros after.
Why pack the pooled embedding into the sequence instead of carrying a (states, pooled) pair: every tensor
operation the erasure and attack code applies to conditions (cat, index, repeat, expand, flatten, the CFG
batch [uncond, cond], balanced draws, moving to a device or dtype) keeps working unchanged and keeps each
prompt's pooled embedding with its own states. Only the UNet call (`unet_inputs`) and the SDXL pipeline
(`split_pooled`) take the row apart. SD 1.x / 2.x conditions are untouched (no extra row): results there are
bit-identical to calling the UNet directly.

SDXL's other added condition, `time_ids` = (original size, crop top-left, target size), is not stored: it is
(H, W, 0, 0, H, W) in pixels, built on each call from the latent's size (`time_ids`), as the SDXL pipeline
builds it for an uncropped image of the size it generates.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

TEXT_TOKENS = 77  # CLIP's context length: the UNet's cross-attention sequence for every family
LATENT_TO_PIXEL = 8  # the SD VAE's downsampling: SDXL's size conditioning is in pixels of the decoded image


# ----------------------------------------------------------------------------------------------
# Families
# ----------------------------------------------------------------------------------------------
def _unet(model):
    """The UNet of a pipeline, of a DDP wrapper (a prepared multi-process student), or the UNet itself."""
    model = getattr(model, "unet", model)
    return getattr(model, "module", model)


def is_sdxl(unet_or_pipe) -> bool:
    """True for a UNet (or a pipeline whose UNet) reads SDXL's added conditions (pooled text + time ids).

    A model without a diffusers config (a test's stand-in) reads `encoder_hidden_states` only.
    """
    config = getattr(_unet(unet_or_pipe), "config", None)
    return getattr(config, "addition_embed_type", None) == "text_time"


def pooled_dim(unet_or_pipe) -> int:
    """d_pool: the width of the pooled text embedding an SDXL UNet reads (1280 for SDXL base).

    The UNet's added-embedding input is [text_embeds (d_pool), 6 Fourier-embedded time ids].
    """
    config = _unet(unet_or_pipe).config
    return config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim


def text_towers(pipe) -> list[tuple]:
    """[(tokenizer, text_encoder)]: one tower for SD 1.x / 2.x, two for SDXL (CLIP ViT-L, then OpenCLIP bigG)."""
    towers = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        towers.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return towers


# ----------------------------------------------------------------------------------------------
# Prompts -> conditions
# ----------------------------------------------------------------------------------------------
def prompt_ids(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """(K, 77) token ids, padded and truncated to `model_max_length` as the diffusers pipelines do."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_ids(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """(K, 77, D) last hidden states of token ids: what an SD 1.x / 2.x UNet reads."""
    return text_encoder(ids.to(text_encoder.device))[0]


def pack(states: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(K, 77, D) states + (K, d_pool) pooled -> (K, 78, D) SDXL condition (the packed pooled row)."""
    row = F.pad(pooled.to(states.dtype), (0, states.shape[-1] - pooled.shape[-1]))  # (K, D), zeros after d_pool
    return torch.cat([states, row[:, None]], dim=1)


def encode_tokens(pipe, ids: Sequence[torch.Tensor]) -> torch.Tensor:
    """The condition of token ids, one (K, 77) id tensor per tower of `text_towers(pipe)`.

    SD: (K, 77, D) last hidden state. SDXL: (K, 78, d1 + d2), both towers' penultimate hidden states
    concatenated and tower 2's projected pooled embedding packed as row 77 (module docstring).
    Differentiable in the text encoders' input embeddings (attacks optimise through it).
    """
    towers = text_towers(pipe)
    if len(ids) != len(towers):
        raise ValueError(f"got {len(ids)} token-id tensors for a pipeline with {len(towers)} text encoder(s)")
    if len(towers) == 1:
        return encode_ids(towers[0][1], ids[0])
    states, pooled = [], None
    for (_, encoder), tower_ids in zip(towers, ids):
        out = encoder(tower_ids.to(encoder.device), output_hidden_states=True)
        states.append(out.hidden_states[-2])  # (K, 77, d_i): SDXL reads the penultimate layer
        pooled = out[0] if out[0].ndim == 2 else pooled  # CLIPTextModelWithProjection's text_embeds (K, d_pool)
    if pooled is None:
        raise ValueError("SDXL's last text encoder gives no pooled embedding; expected a CLIPTextModelWithProjection")
    return pack(torch.cat([s.to(states[-1].dtype) for s in states], dim=-1), pooled)


def encode(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """Conditions of `prompts` in the text encoder's dtype and on its device ((K, 77, D) SD, (K, 78, D) SDXL).

    Learned tokens are included: a multi-vector token is expanded to its `<tok>_1 ...` pieces for each
    tower's tokenizer (`maybe_convert_prompt`), as diffusers does. On SDXL with the pipeline's
    `force_zeros_for_empty_prompt` (SDXL base), "" gives all zeros: SDXL's unconditional condition.
    """
    prompts = list(prompts)
    convert = getattr(pipe, "maybe_convert_prompt", lambda prompt, tokenizer: prompt)
    ids = [prompt_ids(tok, [convert(p, tok) for p in prompts]) for tok, _ in text_towers(pipe)]
    cond = encode_tokens(pipe, ids)
    if is_sdxl(pipe) and pipe.config.get("force_zeros_for_empty_prompt", False):
        empty = torch.tensor([p == "" for p in prompts], device=cond.device)
        cond = torch.where(empty[:, None, None], torch.zeros_like(cond), cond)
    return cond


def split_pooled(cond: torch.Tensor, unet_or_pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL condition (K, 78, D) -> (prompt_embeds (K, 77, D), pooled_prompt_embeds (K, d_pool)), the SDXL
    pipeline's arguments."""
    if cond.shape[1] != TEXT_TOKENS + 1:
        raise ValueError(f"an SDXL condition has {TEXT_TOKENS + 1} rows (77 tokens + the pooled row); got "
                         f"shape {tuple(cond.shape)}: encode it with stereo.conditioning.encode")
    return cond[:, :TEXT_TOKENS], cond[:, TEXT_TOKENS, :pooled_dim(unet_or_pipe)]


# ----------------------------------------------------------------------------------------------
# Conditions -> UNet calls
# ----------------------------------------------------------------------------------------------
def time_ids(sample: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, 6) SDXL size conditioning of latents `sample` (B, C, h, w): (H, W, 0, 0, H, W), H = 8 h.

    The SDXL pipeline's `_get_add_time_ids` for an uncropped image generated at its own size.
    """
    h, w = (LATENT_TO_PIXEL * s for s in sample.shape[-2:])
    row = torch.tensor([h, w, 0, 0, h, w], dtype=dtype or sample.dtype, device=sample.device)
    return row.expand(sample.shape[0], -1)


def unet_inputs(unet, cond: torch.Tensor, sample: torch.Tensor) -> dict:
    """The UNet's keyword arguments for conditions `cond` on latents `sample`.

    SD: {"encoder_hidden_states": cond}. SDXL: the 77 token rows as `encoder_hidden_states` and
    `added_cond_kwargs` {"text_embeds": the packed pooled row's first d_pool entries, "time_ids"}.
    """
    if not is_sdxl(unet):
        return {"encoder_hidden_states": cond}
    states, pooled = split_pooled(cond, unet)
    return {"encoder_hidden_states": states,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids(sample, cond.dtype)}}


def predict(unet, x: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
    """The UNet's output (its `prediction_type`: eps, v or x0) at latents x (B, C, h, w), timestep(s) t."""
    return unet(x, t, **unet_inputs(unet, cond, x)).sample


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the model should predict for x_t = add_noise(latents, noise, t), by the scheduler's prediction_type.

    epsilon -> noise; v_prediction -> v = sqrt(a_t) noise - sqrt(1 - a_t) latents
    (Salimans & Ho 2022, a_t = alphas_cumprod[t]; diffusers' `get_velocity`);
    sample -> latents (x0).
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":  # written out: PNDM and DPM-Solver have no `get_velocity`
        alpha_bar = scheduler.alphas_cumprod.to(latents.device)[t.to(latents.device)].float()
        alpha_bar = alpha_bar.view(-1, *[1] * (latents.ndim - 1))  # (B, 1, 1, 1)
        return (alpha_bar.sqrt() * noise.float() - (1 - alpha_bar).sqrt() * latents.float()).to(noise.dtype)
    if kind == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {kind!r}; expected one of 'epsilon', 'v_prediction', 'sample'")
