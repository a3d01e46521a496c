"""STEREO recipes: STE then REO (`method=stereo`), or REO on the concept alone (`method=reo`)."""

from __future__ import annotations

from stereo.erasure.session import Session
from stereo.reo import run_reo
from stereo.ste import load_ste_tokens, run_ste


def run_stereo(session: Session) -> dict:
    """method.stage: all (STE -> REO), ste (search only), reo (REO with a finished STE folder's tokens)."""
    stage = session.cfg.method.stage
    if stage == "reo":
        tokens = load_ste_tokens(session, session.cfg.method.ste_dir)
    else:
        tokens = run_ste(session)
    if stage == "ste":
        return {"tokens": tokens, "ste_dir": session.output_dir / "ste"}
    return {**run_reo(session, tokens), "tokens": tokens}


def run_reo_only(session: Session) -> dict:
    """REO with negatives = the concept prompts only (no adversarial search): the ablation baseline."""
    return run_reo(session, [])
