"""`train(cfg)`: run the configured erasure method end to end (what `python train.py` calls)."""

from __future__ import annotations

import logging

from stereo.config import validate
from stereo.erasure.session import Session
from stereo.esd import run_esd
from stereo.stereo import run_reo_only, run_stereo

log = logging.getLogger(__name__)
METHODS = {"esd": run_esd, "reo": run_reo_only, "stereo": run_stereo}


def train(cfg) -> dict:
    """Validate `cfg`, run `cfg.method.name` and return its outputs (export folder, losses, ...)."""
    validate(cfg)
    if cfg.method.name not in METHODS:
        raise ValueError(f"method.name={cfg.method.name!r} is not valid; choose one of {', '.join(METHODS)}")
    session = Session(cfg)
    try:
        return METHODS[cfg.method.name](session)
    finally:
        session.close()
