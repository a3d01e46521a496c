"""One interface for every evaluation attack, and the registry that builds them by name.

An attack turns plain evaluation prompts into attacked prompts for one evaluated model:

    attack = build_attack(settings)            # settings: an AttackConfig (name + budget)
    attack.prepare(target)                     # work shared by all prompts (learn a token), cached on disk;
                                               # every process calls it and shares the work
    attacked = attack.attack(target, prompts)  # one AttackedPrompt per prompt, any subset (shardable)

`AttackTarget` carries what an attack may use: the evaluated pipeline, the BASE pipeline (its
concept gallery, its text encoder for black-box attacks), the concept, the detector (attacks
that stop at the first success) and a folder for artifacts. An attacked prompt is text (which
may contain learned tokens, loaded into the evaluated pipeline) and, for hard-token attacks
whose tokens would not survive decoding and re-tokenising, the exact token ids: the first text
tower's; SDXL's second tower reads the same ids between its own [BOS]/[EOS]/padding (`condition_of_ids`).
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from stereo.conditioning import encode_tokens, text_towers
from stereo.generation import generate
from stereo.manifest import write_text_atomic

# name -> module that defines (and registers) the attack; imported on first use.
ATTACK_MODULES = {
    "none": "stereo.attacks.base",
    "concept_inversion": "stereo.attacks.token",
    "soft_prompt": "stereo.attacks.token",
    "token_file": "stereo.attacks.token",
    "unlearndiffatk": "stereo.attacks.unlearndiffatk",
    "ring_a_bell": "stereo.attacks.ring_a_bell",
}
ATTACKS: dict[str, type[Attack]] = {}


@dataclass(frozen=True)
class EvalPrompt:
    """A prompt of the evaluation set with the seed and CFG scale its image is generated with."""

    index: int  # position in the prompt set: the (model, attack, prompt) cell key
    prompt: str
    seed: int
    guidance: float


@dataclass
class AttackedPrompt:
    index: int
    prompt: str  # the original prompt (CLIP score is measured against it)
    seed: int
    guidance: float
    text: str  # what the text encoder reads (may contain learned tokens)
    token_ids: list[int] | None = None  # (77,) exact ids (first tokenizer) of hard-token attacks; None: tokenise `text`
    info: dict[str, Any] = field(default_factory=dict)  # attack-specific: steps used, loss, success

    @classmethod
    def of(cls, prompt: EvalPrompt, text: str, **kwargs: Any) -> AttackedPrompt:
        return cls(prompt.index, prompt.prompt, prompt.seed, prompt.guidance, text, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationSettings:
    steps: int = 50
    batch_size: int = 8


@dataclass
class AttackTarget:
    """What an attack may use (`pipe` is the evaluated model; black-box attacks use only `base_pipe`'s text side)."""

    pipe: Any  # StableDiffusionPipeline under evaluation
    base_pipe: Any  # the original model: concept galleries, public text encoder
    concept: Any  # ConceptConfig
    out_dir: Path  # artifacts of this (model, attack)
    gallery_dir: Path  # shared cache of the base model's concept images
    detector: Any = None  # Detector, for attacks that stop at the first success
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    progress: bool = True
    accelerator: Any = None  # several processes share `prepare`'s work (None: one process)
    restart: int = 0  # which independent restart of the attack this is (`restart_seed`; 0: the attack as configured)


class Attack(ABC):
    """An attack with its budget (`settings`, an AttackConfig). Subclasses register with `@register_attack`."""

    name = "attack"
    white_box = True  # False: never queries the evaluated model (only the public text encoder)

    def __init__(self, settings):
        self.settings = settings

    def prepare(self, target: AttackTarget) -> None:
        """Per-concept work shared by every prompt, cached in `target.out_dir` (default: none).

        Called on every process of a run (with `target.accelerator`), which split the work between
        them; afterwards every process holds the result, e.g. the learned token in its pipeline.
        """
        return None

    @abstractmethod
    def attack(self, target: AttackTarget, prompts: Sequence[EvalPrompt]) -> list[AttackedPrompt]:
        """One attacked prompt per input prompt, in order."""

    def describe(self) -> dict[str, Any]:
        """Name, access (white- or black-box) and the budget, as the report records them."""
        from omegaconf import OmegaConf

        settings = self.settings
        if OmegaConf.is_config(settings):
            settings = OmegaConf.to_container(settings, resolve=True)
        elif is_dataclass(settings):
            settings = asdict(settings)
        return {"name": self.name, "white_box": self.white_box, "budget": settings}


def register_attack(name: str):
    def add(cls):
        if name in ATTACKS and ATTACKS[name] is not cls:
            raise ValueError(f"An attack named {name!r} is already registered ({ATTACKS[name]}).")
        cls.name = name
        ATTACKS[name] = cls
        return cls

    return add


def build_attack(settings) -> Attack:
    """The attack `settings.name` with its budget; unknown names raise a ValueError listing valid ones."""
    name = settings.name
    if name not in ATTACKS and name in ATTACK_MODULES:
        importlib.import_module(ATTACK_MODULES[name])  # registers on import
    if name not in ATTACKS:
        valid = sorted(set(ATTACKS) | set(ATTACK_MODULES))
        raise ValueError(f"Unknown attack {name!r}; valid attacks: {valid}.")
    return ATTACKS[name](settings)


@register_attack("none")
class NoAttack(Attack):
    """The plain prompts: what `pre-attack ASR` is measured on."""

    white_box = False

    def attack(self, target: AttackTarget, prompts: Sequence[EvalPrompt]) -> list[AttackedPrompt]:
        return [AttackedPrompt.of(p, p.prompt) for p in prompts]


# --- helpers shared by attacks and the evaluation runner --------------------------------------
def restart_seed(seed: int, restart: int) -> int:
    """The random seed of restart `restart` of an attack configured with `seed`.

    Restart 0 is the attack as configured (its seed unchanged, so results and caches made before
    restarts existed stay valid). Restart r >= 1 gets a seed derived from (seed, r) by numpy's
    SeedSequence, so restarts of one seed never reuse another seed's stream: with `seed + r`,
    seed 1's restart 0 would be seed 0's restart 1.
    """
    if restart < 0:
        raise ValueError(f"restart={restart} must be >= 0")
    if restart == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(restart)]).generate_state(1)[0])


def wrap_ids(tokenizer, body: Sequence[int]) -> list[int]:
    """[BOS] + body + [EOS] + padding to 77 (body truncated to fit)."""
    length = tokenizer.model_max_length
    body = list(body)[: length - 2]
    ids = [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
    return ids + [tokenizer.pad_token_id] * (length - len(ids))


def body_of(tokenizer, ids: Sequence[int]) -> list[int]:
    """The tokens between [BOS] and the first [EOS] of wrapped ids (`wrap_ids`' inverse)."""
    ids = list(ids)
    start = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
    stop = ids.index(tokenizer.eos_token_id, start) if tokenizer.eos_token_id in ids[start:] else len(ids)
    return ids[start:stop]


def condition_of_ids(pipe, ids: torch.Tensor) -> torch.Tensor:
    """The condition (`stereo.conditioning`) of (K, 77) token ids of the first tokenizer.

    One text tower: the ids as they are. SDXL: tower 2 reads the same tokens, wrapped by its own
    tokenizer (its padding is "!", not [EOS]); the hard-token attacks use ids both tokenizers share.
    """
    towers = text_towers(pipe)
    first = towers[0][0]
    per_tower = [ids] + [torch.tensor([wrap_ids(tokenizer, body_of(first, row)) for row in ids.tolist()])
                         for tokenizer, _ in towers[1:]]
    return encode_tokens(pipe, per_tower)


def render(pipe, attacked: Sequence[AttackedPrompt], generation: GenerationSettings) -> list[Image.Image]:
    """Images of attacked prompts through `stereo.generation.generate` (one per prompt, its own seed).

    Prompts are grouped by CFG scale; those with `token_ids` are encoded from the ids exactly.
    """
    images: list[Image.Image | None] = [None] * len(attacked)
    groups: dict[tuple[float, bool], list[int]] = {}
    for i, item in enumerate(attacked):
        groups.setdefault((float(item.guidance), item.token_ids is not None), []).append(i)
    for (guidance, by_ids), members in groups.items():
        seeds = [attacked[i].seed for i in members]
        common = {"steps": generation.steps, "guidance": guidance, "batch_size": generation.batch_size}
        if by_ids:
            with torch.no_grad():
                embeds = condition_of_ids(pipe, torch.tensor([attacked[i].token_ids for i in members]))
            out = generate(pipe, seeds=seeds, prompt_embeds=embeds, **common)
        else:
            out = generate(pipe, [attacked[i].text for i in members], seeds, **common)
        for i, image in zip(members, out):
            images[i] = image
    return images  # type: ignore[return-value]


def write_attacked(path: str | Path, attacked: Sequence[AttackedPrompt]) -> Path:
    """The attacked prompts as JSON lines (index, prompt, text, token ids, seed, guidance, info), written
    atomically: a process reading the file while another rewrites it sees the old or the new one, whole."""
    path = Path(path)
    write_text_atomic(path, "".join(json.dumps(item.to_dict(), default=str) + "\n"
                                    for item in sorted(attacked, key=lambda a: a.index)))
    return path


def read_attacked(path: str | Path) -> list[AttackedPrompt]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [AttackedPrompt(**json.loads(line)) for line in lines if line.strip()]


def gallery_latents(target: AttackTarget, settings) -> torch.Tensor:
    """VAE latents (N, 4, h, w) of the BASE model's images of the concept (cached in `target.gallery_dir`).

    Every process of the run must call it: the gallery's images are generated shard by shard.
    """
    from stereo.attacks.gallery import concept_gallery, encode_images

    concept = target.concept
    prompts = list(concept.gallery_prompts) or list(concept.prompts)
    images = concept_gallery(target.base_pipe, prompts, settings.gallery_size, target.gallery_dir,
                             seed=settings.seed, steps=settings.gallery_steps,
                             batch_size=target.generation.batch_size, accelerator=target.accelerator)
    return encode_images(target.pipe, images, batch_size=target.generation.batch_size)
