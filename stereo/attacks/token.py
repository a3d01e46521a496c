"""Attacks that learn (or replay) one token for the concept, then prompt with it.

- `concept_inversion` (Pham et al. 2023, the CCE attack): textual inversion against the
  EVALUATED model on the base model's images of the concept (`inversion.learn_token`, AdamW).
- `soft_prompt`: the same loss, PGD on the token's vectors in an L∞ ball (AdvUnlearn style).
- `token_file`: a saved textual-inversion file (e.g. found by STE) replayed as it is.

Attacked prompt i = template[i mod T].format(token): the concept's inversion templates.
Restarts (`target.restart`, one evaluation cell each): restart 0 is the attack as configured;
restart r >= 1 has its own seed (`restart_seed`: batches, noise, timesteps, templates) and its own
start: textual inversion from the initializer's vectors plus Gaussian noise with the token table's
per-coordinate std, PGD from a uniform random point of its L∞ ball (Madry et al.'s random start,
the ball still centred on the initializer's vectors).
On SDXL the token is learned in both text towers at once (`inversion.learn_token`) and saved as
diffusers' SDXL pair {"clip_l", "clip_g"}.
The learned token is saved as a diffusers textual-inversion file, `<out_dir>/token.safetensors`,
with `token.json` holding the budget it was learned with; a later run with the same budget
reuses it (resume). In a run of several processes every process learns it together
(data-parallel inversion, `learn_token(accelerator=...)`) and the main process saves it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict

import torch

from stereo.attacks.base import (
    Attack,
    AttackedPrompt,
    AttackTarget,
    EvalPrompt,
    gallery_latents,
    register_attack,
    restart_seed,
)
from stereo.attacks.inversion import InversionSettings, learn_token, random_start, templates_for
from stereo.attacks.learned_token import has_token, install_token, load_token, save_token
from stereo.manifest import write_json_atomic
from stereo.parallel import is_main, on_main


class TokenAttack(Attack):
    """Base of the token attacks: `prepare` puts the token in the evaluated pipeline, `attack` prompts with it."""

    method = "ti"
    token: str | None = None

    def templates(self, target: AttackTarget) -> tuple[str, ...]:
        return templates_for(target.concept.kind, list(self.settings.templates))

    def inversion_settings(self, target: AttackTarget) -> InversionSettings:
        s = self.settings
        return InversionSettings(steps=s.steps, lr=s.lr, batch_size=s.batch_size, num_vectors=s.num_vectors,
                                 templates=self.templates(target), method=self.method, pgd_eps=s.pgd_eps,
                                 seed=restart_seed(s.seed, target.restart))

    def start(self, target: AttackTarget, settings: InversionSettings) -> torch.Tensor | None:
        """Where restart `target.restart` starts: None (the initializer's vectors) for restart 0; else a
        random point around them drawn from the restart's seed (see the module docstring)."""
        if target.restart == 0:
            return None
        return random_start(target.pipe, target.concept.initializer_token, settings)

    def prepare(self, target: AttackTarget) -> None:
        path, spec_path = target.out_dir / "token.safetensors", target.out_dir / "token.json"
        settings = self.inversion_settings(target)
        spec = {"attack": self.name, "concept": target.concept.name, "initializer": target.concept.initializer_token,
                "settings": asdict(settings), **({"restart": target.restart} if target.restart else {})}
        spec = json.loads(json.dumps(spec, default=list))  # tuples -> lists, as read back from disk
        # decided by the main process for all: a process that saw no token would start an inversion (collectives)
        # that the others never join (NFS attribute caching, several nodes)
        cached = on_main(lambda: path.is_file() and spec_path.is_file()
                         and json.loads(spec_path.read_text())["spec"] == spec, target.accelerator, share=True)
        if cached:
            learned = load_token(path)
            install_token(target.pipe, learned)
        else:  # every process: the gallery is sharded, the inversion data-parallel (same vectors everywhere)
            latents = gallery_latents(target, self.settings)
            token = fresh_token(target.pipe, f"<{target.concept.name}-{target.out_dir.name}>")
            learned = learn_token(target.pipe, latents, token, target.concept.initializer_token, settings,
                                  progress=target.progress, accelerator=target.accelerator,
                                  start=self.start(target, settings))
            if is_main(target.accelerator):
                save_token(learned, path)
                write_json_atomic(spec_path, {"spec": spec,
                                              "final_loss": learned.losses[-1] if learned.losses else None})
        self.token = learned.token

    def attack(self, target: AttackTarget, prompts: Sequence[EvalPrompt]) -> list[AttackedPrompt]:
        if self.token is None:
            raise RuntimeError(f"{self.name}: call prepare(target) before attack(); it puts the token in the pipeline")
        templates = self.templates(target)
        return [AttackedPrompt.of(p, templates[p.index % len(templates)].format(self.token), info={"token": self.token})
                for p in prompts]


@register_attack("concept_inversion")
class ConceptInversion(TokenAttack):
    method = "ti"


@register_attack("soft_prompt")
class SoftPrompt(TokenAttack):
    method = "pgd"


@register_attack("token_file")
class TokenFile(TokenAttack):
    """Replay a textual-inversion file (`settings.token_file`) against the evaluated model."""

    white_box = False

    def prepare(self, target: AttackTarget) -> None:
        path = self.settings.token_file
        if not path:
            raise ValueError("attack token_file needs attacks.<name>.token_file=<path to a textual-inversion "
                             ".safetensors file> (e.g. one saved by concept_inversion or by STE)")
        learned = load_token(path)
        install_token(target.pipe, learned)
        self.token = learned.token


def fresh_token(pipe, token: str) -> str:
    """`token`, or `token` with a numeric suffix if the pipeline (any of its tokenizers) has a token of that name."""
    name, n = token, 1
    while has_token(pipe, name, any_tower=True):
        n += 1
        name = f"{token[:-1]}-{n}>" if token.endswith(">") else f"{token}-{n}"
    return name

