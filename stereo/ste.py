"""Stage 1 of STEREO: Search Thoroughly Enough (Srivatsan et al. 2025, Sec. 3.2).

Adversarial training used as a SEARCH for the concept's blind spots. For rounds k = 0..K-1:
  1. erase (outer minimisation): ESD on the current targets — the concept text in round 0,
     the adversarial embedding(s) found so far afterwards — with the UNet as it was at the start
     of the round as teacher, so erasure accumulates across rounds;
  2. attack (inner maximisation): concept inversion against the just-erased UNet on images of
     the concept made by the ORIGINAL model;
  3. keep the learned embedding: it is an "adversarial prompt" that REO will erase.
The STE-erased UNet is discarded; only the embeddings move on. Every finished round is saved
(`ste/round_k/done.json` written last) and a re-run resumes after the last finished one: a finished
round is STE's checkpoint, and a killed round reruns from its start with the same seeds.
With several processes the gallery is generated and the inversion run data-parallel across them.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from stereo.attacks.gallery import concept_gallery, encode_images
from stereo.attacks.inversion import (
    InversionSettings,
    LearnedToken,
    add_token,
    learn_token,
    load_token,
    save_token,
    templates_for,
)
from stereo.attacks.parallel import main_process_value
from stereo.erasure.session import Session
from stereo.erasure.subsets import subset_parameter_names
from stereo.erasure.trainer import ErasureTrainer, ESDObjective
from stereo.generation import frozen, generate, image_grid, swap_unet
from stereo.manifest import write_json_atomic
from stereo.models.loading import load_unet_weights

log = logging.getLogger(__name__)
DONE = "done.json"


@dataclass
class AdversarialToken:
    """An embedding STE found for `concept` in `round`, and the prompt that uses it."""

    concept: str
    round: int
    learned: LearnedToken
    prompt: str
    file: Path


def adversarial_prompt(session: Session, concept_key: str, token: str) -> str:
    """The adversarial token in the first inversion template of its concept (the context it was learned in)."""
    concept = session.cfg.concepts[concept_key]
    return templates_for(concept.kind, concept.inversion_templates)[0].format(token)


def run_ste(session: Session) -> list[AdversarialToken]:
    """All rounds of STE (resuming finished ones); returns every adversarial token found, in order."""
    cfg, ste = session.cfg, session.cfg.method.ste
    root = session.output_dir / "ste"
    galleries = _galleries(session, root / "gallery")
    unet, found = session.base_unet, []
    for k in range(ste.rounds):
        round_dir = root / f"round_{k}"
        if main_process_value((round_dir / DONE).is_file()):  # one answer: the branches differ in collectives
            unet, tokens = _load_round(session, round_dir, unet)
            found += tokens
            log.info("STE round %d already finished; loaded %s", k, ", ".join(t.learned.token for t in tokens))
            continue
        began = time.perf_counter()
        targets = _round_targets(session, found, k)
        erased, trained_names = _erase(session, unet, targets, k)
        tokens = [_attack(session, erased, key, k, galleries[key], round_dir) for key in cfg.concepts]
        _save_round(session, round_dir, erased, trained_names, tokens, targets, unet, time.perf_counter() - began)
        unet, found = erased, found + tokens
    if session.accelerator.is_main_process:
        write_json_atomic(root / "tokens.json", [
            {"concept": t.concept, "round": t.round, "token": t.learned.token, "prompt": t.prompt,
             "file": str(t.file.relative_to(root))} for t in found])
    return found


def _galleries(session: Session, root: Path) -> dict[str, torch.Tensor]:
    """VAE latents of each concept's gallery, generated once by the original model (split across processes)."""
    ste, res = session.cfg.method.ste, session.cfg.model.resolution
    latents = {}
    for key, concept in session.cfg.concepts.items():
        images = concept_gallery(session.pipe, list(concept.gallery_prompts or concept.prompts), ste.gallery_size,
                                 root / key, seed=session.seed, steps=ste.gallery_steps,
                                 guidance=ste.gallery_guidance, resolution=res, accelerator=session.accelerator)
        latents[key] = encode_images(session.pipe, images)
    return latents


def _round_targets(session: Session, found: list[AdversarialToken], k: int) -> list[str]:
    """Round 0 erases the concept text; later rounds the latest embedding per concept (or all found)."""
    if k == 0:
        return session.concept_prompts()
    if session.cfg.method.ste.erase_all_found:
        return [t.prompt for t in found]
    return [t.prompt for t in found if t.round == k - 1]


def _erase(session: Session, unet, targets: list[str], k: int):
    """ESD on `targets`, starting from and taught by `unet`; returns the erased fp32 student, frozen.

    No checkpoints inside a round (see the module docstring); the trainer is closed when the round's
    erasure ends, so the accelerator never holds more than the one student being trained. The erased
    UNet stays in fp32 even when the base model is half precision: a round moves weights by less
    than one bf16 step (2^-8 relative), so a half-precision copy would drop part of the erasure that
    the round's attack, and the next round, must face.
    """
    ste = session.cfg.method.ste
    objective = ESDObjective(negatives=session.encode(targets), uncond=session.encode([""])[0], eta=ste.erase_eta)
    student, teacher, _ = session.make_student(init=unet)
    settings = session.trainer_settings(steps=ste.erase_steps, lr=ste.erase_lr, desc=f"ste{k} erase", resume=False,
                                        checkpoint_every=0)
    with ErasureTrainer(session.accelerator, student, teacher, session.pipe.scheduler, objective, settings,
                        on_log=session.log) as trainer:
        trainer.run()
    erased = frozen(trainer.student)  # closed: the plain module, its optimiser state released
    return erased, subset_parameter_names(erased, session.subset)


def _attack(session: Session, erased, key: str, k: int, latents: torch.Tensor, round_dir: Path) -> AdversarialToken:
    """Concept inversion against the erased UNet on this round's share of the gallery."""
    ste, concept = session.cfg.method.ste, session.cfg.concepts[key]
    inv = ste.inversion
    if ste.gallery_split:
        share = max(1, len(latents) // ste.rounds)
        latents = latents[k * share:(k + 1) * share] if len(latents) >= ste.rounds else latents
    settings = InversionSettings(steps=inv.steps, lr=inv.lr, batch_size=inv.batch_size, num_vectors=inv.num_vectors,
                                 templates=templates_for(concept.kind, inv.templates or concept.inversion_templates),
                                 method=inv.method, pgd_eps=inv.pgd_eps, seed=session.seed * 1000 + k)
    token = f"<{key}-ste{k}>"
    # data-parallel over processes: every process ends with the same vectors
    with swap_unet(session.pipe, erased, for_generation=False) as pipe:
        learned = learn_token(pipe, latents, token, concept.initializer_token, settings,
                              progress=session.accelerator.is_local_main_process, accelerator=session.accelerator)
    session.log(0, {f"ste/round{k}/{key}/inversion_loss": learned.losses[-1] if learned.losses else float("nan")})
    return AdversarialToken(key, k, learned, adversarial_prompt(session, key, token), round_dir / f"{key}.safetensors")


def _save_round(session, round_dir: Path, erased, trained_names, tokens, targets, before, seconds) -> None:
    if not session.accelerator.is_main_process:
        session.accelerator.wait_for_everyone()
        return
    round_dir.mkdir(parents=True, exist_ok=True)
    for t in tokens:
        save_token(t.learned, t.file)
    state = erased.state_dict()
    delta = {n: state[n].detach().cpu().contiguous() for n in trained_names}
    save_file(delta, str(round_dir / "unet_delta.safetensors"))
    _round_grid(session, round_dir, before, erased, tokens)
    write_json_atomic(round_dir / DONE, {  # written last: marks the round as finished
        "round": tokens[0].round, "erased": targets, "seconds": seconds,
        "tokens": [{"concept": t.concept, "token": t.learned.token, "prompt": t.prompt, "file": t.file.name,
                    "final_inversion_loss": t.learned.losses[-1] if t.learned.losses else None} for t in tokens],
    })
    session.accelerator.wait_for_everyone()


def _round_grid(session: Session, round_dir: Path, before, erased, tokens) -> None:
    """Columns: concept prompt before the round, concept prompt after, adversarial prompt after; rows: seeds."""
    t, res, seeds = session.cfg.trainer, session.cfg.model.resolution, (0, 1)
    columns = [(unet, prompt) for token in tokens
               for unet, prompt in ((before, session.cfg.concepts[token.concept].prompts[0]),
                                    (erased, session.cfg.concepts[token.concept].prompts[0]), (erased, token.prompt))]
    images = {}
    for unet in (before, erased):  # one swap (and at most one half-precision copy) per UNet
        wanted = [(c, seed) for c, (u, _) in enumerate(columns) if u is unet for seed in seeds]
        with swap_unet(session.pipe, unet) as pipe:
            drawn = generate(pipe, [columns[c][1] for c, _ in wanted], [seed for _, seed in wanted],
                             steps=t.sample_steps, guidance=t.sample_guidance, height=res, width=res)
        images.update(zip(wanted, drawn))
    grid = [images[c, seed] for seed in seeds for c in range(len(columns))]
    image_grid(grid, cols=len(columns)).save(round_dir / "grid.png")


def _load_round(session: Session, round_dir: Path, unet):
    """A finished round: its erased UNet (start UNet + saved tensors, fp32 as `_erase` keeps it) and its tokens."""
    erased = copy.deepcopy(unet).float()
    load_unet_weights(erased, round_dir / "unet_delta.safetensors")
    return erased, _load_round_tokens(session, round_dir)


def _load_round_tokens(session: Session, round_dir: Path) -> list[AdversarialToken]:
    """The tokens a finished round found, added to the pipeline's tokenizer and text encoder."""
    done = json.loads((round_dir / DONE).read_text())
    tokens = []
    for entry in done["tokens"]:
        learned = load_token(round_dir / entry["file"])
        if learned.token not in session.pipe.tokenizer.get_vocab():
            add_token(session.pipe, learned)
        tokens.append(AdversarialToken(entry["concept"], done["round"], learned, entry["prompt"],
                                       round_dir / entry["file"]))
    return tokens


def load_ste_tokens(session: Session, ste_dir: str | Path) -> list[AdversarialToken]:
    """The tokens of a finished STE folder (`<run>/ste` or the run folder itself), added to the pipeline."""
    root = Path(ste_dir)
    root = root / "ste" if (root / "ste").is_dir() else root
    rounds = sorted(root.glob("round_*"), key=lambda p: int(p.name.split("_")[1]))
    finished = [r for r in rounds if (r / DONE).is_file()]
    if not finished:
        raise FileNotFoundError(f"no finished STE round (round_*/{DONE}) under {root}; run method.stage=ste first")
    return [token for round_dir in finished for token in _load_round_tokens(session, round_dir)]
