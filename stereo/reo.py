"""Stage 2 of STEREO: Robustly Erase Once (Srivatsan et al. 2025, Sec. 3.3).

Start again from the ORIGINAL UNet. Negatives N = the concept prompts ∪ the adversarial
embeddings STE found; anchors A = benign prompts that contain the concept in context. Each
step draws one negative (balanced) for the student and anchors (balanced) for the target

    eps* = eps_0(∅) + eta_a mean_a(eps_0(a) - eps_0(∅)) - eta_n mean_{n∈N}(eps_0(n) - eps_0(∅)),

so the context of the anchors is kept while the concept and all its found variants are pushed
away — in one fine-tuning run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from stereo.anchors import get_anchors
from stereo.erasure.session import Session
from stereo.erasure.trainer import ErasureTrainer, REOObjective
from stereo.ste import AdversarialToken

log = logging.getLogger(__name__)


def concept_anchors(session: Session) -> list[str]:
    """Anchor prompts of every selected concept: its anchor file, built-in set, cache, or LLM.

    Fetched by the main process and given to the others: an LLM asked once per process would give
    each process a different anchor set (and pay for every request).
    """
    return session.from_main_process(lambda: _fetch_anchors(session.cfg))


def _fetch_anchors(cfg) -> list[str]:
    n = cfg.method.reo.num_anchors
    anchors: list[str] = []
    for key, concept in cfg.concepts.items():
        source = concept.anchors or key
        if Path(source).expanduser().is_file():
            anchors += get_anchors(key, n, source="file", anchors_file=source)
        else:
            anchors += get_anchors(source, n)
    return list(dict.fromkeys(anchors))  # de-duplicated, order kept


def select_adversarial(tokens: list[AdversarialToken], which: str) -> list[AdversarialToken]:
    if which == "none" or not tokens:
        return []
    if which == "last":
        last = max(t.round for t in tokens)
        return [t for t in tokens if t.round == last]
    return list(tokens)


def run_reo(session: Session, tokens: list[AdversarialToken] | None = None) -> dict:
    """Erase the concept prompts and the selected adversarial tokens from the base UNet; export."""
    reo = session.cfg.method.reo
    adversarial = select_adversarial(tokens or [], reo.adversarial)
    negatives = session.concept_prompts() + [t.prompt for t in adversarial]
    anchors = concept_anchors(session)
    log.info("REO: %d negatives (%d adversarial), %d anchors", len(negatives), len(adversarial), len(anchors))
    objective = REOObjective(negatives=session.encode(negatives), uncond=session.encode([""])[0],
                             anchors=session.encode(anchors), eta_a=reo.eta_a, eta_n=reo.eta_n,
                             anchors_per_step=reo.anchors_per_step)
    student, teacher, names = session.make_student()
    with ErasureTrainer(session.accelerator, student, teacher, session.pipe.scheduler, objective,
                        session.trainer_settings(steps=reo.steps, lr=reo.lr, desc="reo"),
                        checkpoint_dir=session.output_dir / "checkpoints", on_log=session.log,
                        on_sample=session.sampler(session.concept_prompts(), "reo")) as trainer:
        result = trainer.run()
        unet = session.accelerator.unwrap_model(trainer.student).eval()
    export_dir = session.export(unet, names, erased=negatives, anchors=len(anchors),
                                adversarial_tokens=[t.learned.token for t in adversarial],
                                final_loss=result.losses[-1] if result.losses else None)
    samples = session.save_samples(unet, session.concept_prompts() + [t.prompt for t in adversarial][:2], "reo")
    return {"export_dir": export_dir, "samples": samples, "losses": result.losses, "unet": unet,
            "trainable": names, "seconds": result.seconds, "negatives": negatives, "anchors": anchors,
            "local_losses": result.local_losses}
