"""STEREO (Srivatsan et al. 2025): Search Thoroughly Enough, then Robustly Erase Once.

Stage 1, STE (Sec. 3.2) — adversarial training used as a SEARCH for the concept's blind spots.
For rounds k = 0..K-1:
  1. erase (outer minimisation): ESD on the current targets — the concept text in round 0, the
     adversarial embedding(s) found so far afterwards — taught by the UNet as it was at the start of
     the round, so erasure accumulates across rounds;
  2. attack (inner maximisation): concept inversion against the JUST-ERASED UNet, on images of the
     concept made by the ORIGINAL model;
  3. keep the learned embedding: an "adversarial prompt" that REO will erase.
The STE-erased UNet is discarded; only the embeddings move on. A finished round is saved and is
STE's checkpoint (`ste_rounds.py`): a re-run resumes after the last finished one.

Stage 2, REO (Sec. 3.3) — start again from the ORIGINAL UNet. Negatives N = the concept prompts ∪
the adversarial embeddings; anchors A = benign prompts that show the concept's context. Each latent
is about one negative (balanced) and draws anchors (balanced) for the compositional target

    eps* = eps_0(∅) + eta_a mean_a(eps_0(a) - eps_0(∅)) - eta_n mean_{n∈N}(eps_0(n) - eps_0(∅)),

so the anchors' context is kept while the concept and all its found variants are pushed away, in
one fine-tuning run. The maths: `stereo/erasure/objectives.py`; the loop: `stereo/erasure/trainer.py`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from stereo.anchors import get_anchors
from stereo.attacks.gallery import concept_gallery, encode_images
from stereo.attacks.inversion import InversionSettings, learn_token, random_start, templates_for
from stereo.erasure.context import RunContext
from stereo.erasure.objectives import ESDObjective, REOObjective
from stereo.erasure.previews import grid_prompts, sampler, save_samples
from stereo.erasure.subsets import make_student, subset_parameter_names
from stereo.erasure.trainer import ErasureTrainer, TrainerSettings
from stereo.generation import frozen, swap_unet
from stereo.parallel import main_process_value
from stereo.recipes.ste_rounds import (
    AdversarialToken,
    is_finished,
    load_round,
    load_ste_tokens,
    save_round,
    write_token_index,
)

log = logging.getLogger(__name__)


def run_stereo(ctx: RunContext) -> dict:
    """method.stage: all (STE -> REO), ste (search only), reo (REO with a finished STE folder's tokens)."""
    stage = ctx.cfg.method.stage
    if stage == "reo":
        tokens = load_ste_tokens(ctx.pipe, ctx.cfg.method.ste_dir)
        return {**reo(ctx, tokens), "tokens": tokens}
    tokens, unet = ste(ctx)
    if stage == "ste":  # a search; with method.ste.export_last, also an erasure (the last round's UNet)
        exported = export_ste(ctx, tokens, unet) if ctx.cfg.method.ste.export_last else {}
        return {**exported, "tokens": tokens, "ste_dir": ctx.output_dir / "ste"}
    return {**reo(ctx, tokens), "tokens": tokens}


def run_reo_only(ctx: RunContext) -> dict:
    """REO with negatives = the concept prompts only (no adversarial search): the ablation baseline."""
    return reo(ctx, [])


# ----------------------------------------------------------------------------------------------
# Stage 1: STE
# ----------------------------------------------------------------------------------------------
def ste(ctx: RunContext) -> tuple[list[AdversarialToken], torch.nn.Module]:
    """All rounds of STE (resuming finished ones); returns every adversarial token found, in order, and the
    UNet of the last round (erased of the concept and of every token the earlier rounds found)."""
    cfg, root = ctx.cfg, ctx.output_dir / "ste"
    galleries = _galleries(ctx, root / "gallery")
    unet, found = ctx.base_unet, []
    for k in range(cfg.method.ste.rounds):
        round_dir = root / f"round_{k}"
        if main_process_value(is_finished(round_dir)):  # one answer: the branches differ in collectives
            unet, tokens = load_round(ctx.pipe, round_dir, unet)
            found += tokens
            log.info("STE round %d already finished; loaded %s", k, ", ".join(t.learned.token for t in tokens))
            continue
        began = time.perf_counter()
        targets = round_targets(ctx, found, k)
        erased = _erase(ctx, unet, targets, k)  # 1. outer minimisation
        tokens = [_attack(ctx, erased, key, k, j, galleries[key], round_dir)  # 2. inner maximisation
                  for key in cfg.concepts for j in range(cfg.method.ste.tokens_per_round)]
        save_round(ctx, round_dir, erased, subset_parameter_names(erased, ctx.subset), tokens, targets, unet,
                   time.perf_counter() - began)
        unet, found = erased, found + tokens  # 3. keep the embeddings; the next round starts from `erased`
    write_token_index(ctx, root, found)
    return found, unet


def export_ste(ctx: RunContext, tokens: list[AdversarialToken], unet) -> dict:
    """method.stage=ste method.ste.export_last=true: the last round's UNet is the run's export. It is STE's
    sequential adversarial erasure without REO (an ablation: what REO's one run from the original model keeps
    of STE's robustness). The last round's tokens were found, not erased, so they are not in `erased`."""
    names = subset_parameter_names(unet, ctx.subset)
    last = max((t.round for t in tokens), default=0)
    erased_tokens = [t for t in tokens if t.round < last]  # the last round's were only found
    erased = ctx.concept_prompts() + [t.prompt for t in erased_tokens]
    export_dir = ctx.export(unet, names, stage="ste", erased=erased,
                            adversarial_tokens=[t.learned.token for t in erased_tokens])
    return {"export_dir": export_dir, "unet": unet, "trainable": names, "negatives": erased}


def round_targets(ctx: RunContext, found: list[AdversarialToken], k: int) -> list[str]:
    """Round 0 erases the concept text; later rounds every embedding found so far (or only the latest)."""
    if k == 0:
        return ctx.concept_prompts()
    if ctx.cfg.method.ste.erase_all_found:
        return [t.prompt for t in found]
    return [t.prompt for t in found if t.round == k - 1]


def _galleries(ctx: RunContext, root: Path) -> dict[str, torch.Tensor]:
    """VAE latents of each concept's gallery, generated once by the original model (split across processes)."""
    ste_cfg, res = ctx.cfg.method.ste, ctx.cfg.model.resolution
    latents = {}
    for key, concept in ctx.cfg.concepts.items():
        images = concept_gallery(ctx.pipe, list(concept.gallery_prompts or concept.prompts), ste_cfg.gallery_size,
                                 root / key, seed=ctx.seed, steps=ste_cfg.gallery_steps,
                                 guidance=ste_cfg.gallery_guidance, resolution=res, accelerator=ctx.accelerator)
        latents[key] = encode_images(ctx.pipe, images)
    return latents


def _erase(ctx: RunContext, unet, targets: list[str], k: int):
    """ESD on `targets`, starting from and taught by `unet`; returns the erased fp32 student, frozen.

    No checkpoints inside a round (a finished round is the checkpoint); the trainer is closed when the
    round's erasure ends, so the accelerator never holds more than the one student being trained. The
    erased UNet stays in fp32 even when the base model is half precision: a round moves weights by less
    than one bf16 step (2^-8 relative), so a half-precision copy would drop part of the erasure that the
    round's attack, and the next round, must face.
    """
    ste_cfg = ctx.cfg.method.ste
    objective = ESDObjective(negatives=ctx.encode(targets), uncond=ctx.encode([""])[0], eta=ste_cfg.erase_eta,
                             seed=ctx.seed, **ctx.preservation())
    student, teacher, _ = make_student(unet, ctx.subset, ctx.cfg.method.lora)
    settings = TrainerSettings.from_config(ctx.cfg, ctx.latent_size, steps=ste_cfg.erase_steps, lr=ste_cfg.erase_lr,
                                           desc=f"ste{k} erase", resume=False, checkpoint_every=0)
    with ErasureTrainer(ctx.accelerator, student, teacher, ctx.pipe.scheduler, objective, settings,
                        on_log=ctx.log) as trainer:
        trainer.run()
    return frozen(trainer.student)  # closed: the plain module, its optimiser state released


def _attack(ctx: RunContext, erased, key: str, k: int, j: int, latents: torch.Tensor,
            round_dir: Path) -> AdversarialToken:
    """Concept inversion against the erased UNet on this round's share of the gallery (data-parallel).

    Token j of the round (`method.ste.tokens_per_round`): j = 0 starts at the initializer's vectors, j > 0
    from a random start with a seed of its own, so the round finds several blind spots, not one twice.
    """
    ste_cfg, concept = ctx.cfg.method.ste, ctx.cfg.concepts[key]
    inv = ste_cfg.inversion
    if ste_cfg.gallery_split:
        share = max(1, len(latents) // ste_cfg.rounds)
        latents = latents[k * share:(k + 1) * share] if len(latents) >= ste_cfg.rounds else latents
    templates = templates_for(concept.kind, inv.templates or concept.inversion_templates)
    seed = ctx.seed * 1000 + k if j == 0 else (ctx.seed * 1000 + k) * 1000 + j
    settings = InversionSettings(steps=inv.steps, lr=inv.lr, batch_size=inv.batch_size, num_vectors=inv.num_vectors,
                                 templates=templates, method=inv.method, pgd_eps=inv.pgd_eps, seed=seed)
    token = f"<{key}-ste{k}>" if j == 0 else f"<{key}-ste{k}-{j}>"
    with swap_unet(ctx.pipe, erased, for_generation=False) as pipe:  # every process ends with the same vectors
        start = None if j == 0 else random_start(pipe, concept.initializer_token, settings)
        learned = learn_token(pipe, latents, token, concept.initializer_token, settings,
                              progress=ctx.accelerator.is_local_main_process, accelerator=ctx.accelerator, start=start)
    name = key if j == 0 else f"{key}-{j}"
    ctx.log(None, {f"ste/round{k}/{name}/inversion_loss": learned.losses[-1] if learned.losses else float("nan")})
    prompt = templates_for(concept.kind, concept.inversion_templates)[0].format(token)  # the context it was learned in
    return AdversarialToken(key, k, learned, prompt, round_dir / f"{name}.safetensors")


# ----------------------------------------------------------------------------------------------
# Stage 2: REO
# ----------------------------------------------------------------------------------------------
def reo(ctx: RunContext, tokens: list[AdversarialToken]) -> dict:
    """Erase the concept prompts and the selected adversarial tokens from the ORIGINAL UNet; export."""
    cfg, reo_cfg = ctx.cfg, ctx.cfg.method.reo
    adversarial = select_adversarial(tokens, reo_cfg.adversarial)
    negatives = ctx.concept_prompts() + [t.prompt for t in adversarial]
    anchors = reo_anchors(ctx)
    log.info("REO: %d negatives (%d adversarial), %d anchors", len(negatives), len(adversarial), len(anchors))
    objective = REOObjective(negatives=ctx.encode(negatives), uncond=ctx.encode([""])[0], anchors=ctx.encode(anchors),
                             eta_a=reo_cfg.eta_a, eta_n=reo_cfg.eta_n, anchors_per_step=reo_cfg.anchors_per_step,
                             seed=ctx.seed, **ctx.preservation())
    student, teacher, names = make_student(ctx.base_unet, ctx.subset, cfg.method.lora)
    steps = reo_cfg.steps if reo_cfg.steps_per_negative is None else reo_cfg.steps_per_negative * len(negatives)
    settings = TrainerSettings.from_config(cfg, ctx.latent_size, steps=steps, lr=reo_cfg.lr, desc="reo")
    with ErasureTrainer(ctx.accelerator, student, teacher, ctx.pipe.scheduler, objective, settings,
                        checkpoint_dir=ctx.output_dir / "checkpoints", on_log=ctx.log,
                        on_sample=sampler(ctx, grid_prompts(ctx), "reo")) as trainer:
        result = trainer.run()
    unet = trainer.student.eval()  # closed: the plain module
    export_dir = ctx.export(unet, names, erased=negatives, anchors=len(anchors),
                            adversarial_tokens=[t.learned.token for t in adversarial],
                            final_loss=result.losses[-1] if result.losses else None)
    samples = save_samples(ctx, unet, grid_prompts(ctx, [t.prompt for t in adversarial][:2]), "reo")
    return {"export_dir": export_dir, "samples": samples, "losses": result.losses, "unet": unet,
            "trainable": names, "seconds": result.seconds, "negatives": negatives, "anchors": anchors,
            "local_losses": result.local_losses}


def select_adversarial(tokens: list[AdversarialToken], which: str) -> list[AdversarialToken]:
    """method.reo.adversarial: all found tokens, those of the last round, or none."""
    if which == "none" or not tokens:
        return []
    if which == "last":
        last = max(t.round for t in tokens)
        return [t for t in tokens if t.round == last]
    return list(tokens)


def reo_anchors(ctx: RunContext) -> list[str]:
    """The anchors, fetched by the main process and given to the others: an LLM asked once per process would
    give each process a different anchor set (and pay for every request)."""
    return ctx.from_main_process(lambda: concept_anchors(ctx.cfg))


def concept_anchors(cfg) -> list[str]:
    """Anchor prompts of every selected concept: its anchor file, built-in set, cache, or LLM (de-duplicated)."""
    n = cfg.method.reo.num_anchors
    anchors: list[str] = []
    for key, concept in cfg.concepts.items():
        source = concept.anchors or key
        if Path(source).expanduser().is_file():
            anchors += get_anchors(key, n, source="file", anchors_file=source)
        else:
            anchors += get_anchors(source, n)
    return list(dict.fromkeys(anchors))
