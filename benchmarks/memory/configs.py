"""What the memory estimate depends on, read from the real configs, and the model's modules to build on meta."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from diffusers import UNet2DConditionModel

from stereo.config import compose, erased_subset
from stereo.evaluation.config import compose_eval
from stereo.models.loading import SD14_CONFIGS, SD21_CONFIGS, SDXL_CONFIGS, read_config, torch_dtype

ATTACKS = ("concept_inversion", "soft_prompt", "unlearndiffatk", "ring_a_bell")  # the traced ones


def _sd14_config(name: str) -> dict:
    config = json.loads((SD14_CONFIGS / name).read_text())
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}


def builders(model: str):
    """(unet, text_encoder, vae) constructors of a model kind, for the meta device."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    if model == "sd14-random":
        return (lambda: UNet2DConditionModel.from_config(_sd14_config("unet.json")),
                lambda: CLIPTextModel(CLIPTextConfig(**_sd14_config("text_encoder.json"))),
                lambda: AutoencoderKL.from_config(_sd14_config("vae.json")))
    if model == "sd21-random":
        return (lambda: UNet2DConditionModel.from_config(read_config("unet.json", SD21_CONFIGS)),
                lambda: CLIPTextModel(CLIPTextConfig(**read_config("text_encoder.json", SD21_CONFIGS))),
                lambda: AutoencoderKL.from_config(read_config("vae.json", SD21_CONFIGS)))
    if model == "sdxl-random":
        return (lambda: _SDXLUNet.from_config(read_config("unet.json", SDXL_CONFIGS)), _sdxl_text_towers,
                lambda: AutoencoderKL.from_config(read_config("vae.json", SDXL_CONFIGS)))
    if model == "tiny":
        from stereo.models.tiny import tiny_text_encoder, tiny_unet, tiny_vae

        return tiny_unet, tiny_text_encoder, tiny_vae
    raise ValueError(f"--model {model!r} is not valid; choose sd14-random, sd21-random, sdxl-random or tiny")


# --- SDXL on the traced code paths, which call one text encoder and `unet(x, t, encoder_hidden_states=...)` ---
class _SDXLUNet(UNet2DConditionModel):
    """SDXL's UNet; called without `added_cond_kwargs` it adds what stereo.conditioning passes: the pooled
    text embedding (B, 1280) and the 6 size/crop numbers (B, 6) (a few KiB: the memory is the UNet's)."""

    def forward(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, **kwargs):
        if added_cond_kwargs is None:
            pooled = self.config.projection_class_embeddings_input_dim - 6 * self.config.addition_time_embed_dim
            added_cond_kwargs = {"text_embeds": encoder_hidden_states.new_zeros(sample.shape[0], pooled),
                                 "time_ids": encoder_hidden_states.new_zeros(sample.shape[0], 6)}
        return super().forward(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs,
                               **kwargs)


def _sdxl_text_towers():
    """SDXL's two text towers as the one text encoder the traces call: ids -> ((B, 77, 768 + 1280) penultimate
    states of both, tower 2's pooled projection), as diffusers' SDXL encode_prompt computes them. A token's
    vectors are (n, 2048): the hookable input embedding is both towers' rows side by side, and each tower
    reads its slice. Approximation: UnlearnDiffAtk's vocabulary table is read as one (V, 2048) tensor."""
    from torch import nn
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    first = CLIPTextModel(CLIPTextConfig(**read_config("text_encoder.json", SDXL_CONFIGS)))
    second = CLIPTextModelWithProjection(CLIPTextConfig(**read_config("text_encoder_2.json", SDXL_CONFIGS)))

    class JointEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.tables = [first.get_input_embeddings(), second.get_input_embeddings()]  # not submodules

        @property
        def weight(self) -> torch.Tensor:
            return torch.cat([t.weight for t in self.tables], dim=-1)

        def forward(self, ids):
            return torch.cat([t(ids) for t in self.tables], dim=-1)

    class TwoTowers(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second, self.joint = first, second, JointEmbedding()
            self.config = CLIPTextConfig(hidden_size=first.config.hidden_size + second.config.hidden_size)

        def get_input_embeddings(self):
            return self.joint

        def forward(self, ids):
            rows = self.joint(ids).split([self.first.config.hidden_size, self.second.config.hidden_size], dim=-1)
            with _rows(self.first, rows[0]):
                states = [self.first(ids, output_hidden_states=True).hidden_states[-2]]
            with _rows(self.second, rows[1]):
                out = self.second(ids, output_hidden_states=True)
            return torch.cat([states[0], out.hidden_states[-2]], dim=-1), out.text_embeds

    return TwoTowers()


class _rows:
    """While active, `tower`'s token embedding returns `rows` (its slice of the joint embedding)."""

    def __init__(self, tower, rows):
        self.tower, self.rows = tower, rows

    def __enter__(self):
        self.handle = self.tower.get_input_embeddings().register_forward_hook(lambda m, i, o: self.rows.to(o.dtype))

    def __exit__(self, *exc):
        self.handle.remove()


@dataclass(frozen=True)
class Setup:
    """Everything the estimate depends on, read from the real configs (`model=<m> trainer=gpu method=stereo`)."""

    model: str
    resolution: int
    frozen_dtype: str
    batch: int
    gradient_checkpointing: bool
    subset: str
    concept_prompts: int
    rounds: int
    inversion_batch: int
    anchors_per_step: int
    gallery_size: int
    eval_inversion_batch: int
    eval_soft_prompt_batch: int
    uda_prompt_batch: int
    uda_prefix_tokens: int
    rab_population: int
    rab_prompt_batch: int
    generation_batch: int
    teacher_autocast: bool = False  # the plan: the bf16 teacher runs outside autocast
    lora_enabled: bool = False  # method.lora.*: an adapter on the subset's layers instead of the layers themselves
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_dropout: float = 0.0

    @property
    def frozen(self) -> torch.dtype:
        return torch_dtype(self.frozen_dtype)

    @property
    def lora(self) -> SimpleNamespace:
        """method.lora as `make_student` reads it."""
        return SimpleNamespace(enabled=self.lora_enabled, rank=self.lora_rank, alpha=self.lora_alpha,
                               dropout=self.lora_dropout)


def read_setup(model: str, concept: str = "nudity", overrides: tuple[str, ...] = ()) -> Setup:
    cfg = compose([f"model={model}", "trainer=gpu", "method=stereo", f"concept={concept}",
                   "model.dtype=bf16", *overrides])
    evaluation = compose_eval([f"attack=[{','.join(ATTACKS)}]"])  # each attack's budget as evaluate.py reads it
    attack = evaluation.attacks
    ste, reo, lora = cfg.method.ste, cfg.method.reo, cfg.method.lora
    return Setup(
        model=model, resolution=cfg.model.resolution, frozen_dtype=cfg.model.dtype, batch=cfg.trainer.batch_size,
        gradient_checkpointing=cfg.trainer.gradient_checkpointing, subset=erased_subset(cfg),
        concept_prompts=sum(len(c.prompts) for c in cfg.concepts.values()), rounds=ste.rounds,
        inversion_batch=ste.inversion.batch_size, anchors_per_step=reo.anchors_per_step,
        gallery_size=ste.gallery_size, eval_inversion_batch=attack["concept_inversion"].batch_size,
        eval_soft_prompt_batch=attack["soft_prompt"].batch_size,
        uda_prompt_batch=attack["unlearndiffatk"].prompt_batch,
        uda_prefix_tokens=attack["unlearndiffatk"].prefix_tokens,
        rab_population=attack["ring_a_bell"].population, rab_prompt_batch=attack["ring_a_bell"].prompt_batch,
        generation_batch=evaluation.generation.batch_size, lora_enabled=bool(lora.enabled), lora_rank=int(lora.rank),
        lora_alpha=float(lora.alpha), lora_dropout=float(lora.dropout),
    )


def latent_size(setup: Setup) -> int:
    with torch.device("meta"):
        vae = builders(setup.model)[2]()
    return setup.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
