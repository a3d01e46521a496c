"""The registry of released erased checkpoints (`released.yaml` beside this file), by name.

Each entry says what the checkpoint is (method, paper, concept, base model), which component of the
pipeline it replaces (`COMPONENTS`) and where it lives: a hub repo with a subfolder and/or file, or, for
checkpoints not on the Hub, a download `url` (then the file is given as a local path). `verified` says
whether that location was checked against the authors' own pages (`source`). An evaluated model names an
entry with `released: <name>`; its own hub fields, when set, override the entry's (a local path for `hub`,
a pinned `hub_revision`, an expected `sha256`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path

import yaml

REGISTRY = Path(__file__).with_name("released.yaml")
COMPONENTS = ("unet", "text_encoder", "lora", "textual_inversion")  # what a third-party checkpoint replaces


@dataclass(frozen=True)
class ReleasedModel:
    name: str
    method: str
    paper: str
    concept: str
    base_model: str  # the model it was erased from (hub id)
    component: str  # one of COMPONENTS
    hub: str | None = None  # hub repo id; None: not on the Hub (see url)
    subfolder: str | None = None
    filename: str | None = None
    revision: str | None = None  # None: unpinned (the resolved commit is recorded)
    sha256: str | None = None  # expected digest of the file / folder (stereo.models.hub.sha256_of)
    url: str | None = None  # download page of a checkpoint that is not on the Hub
    verified: bool = False  # location checked against the authors' pages
    source: str = ""  # where it was checked

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise ValueError(f"released model {self.name!r}: component={self.component!r} is not valid; "
                             f"choose one of {', '.join(COMPONENTS)}")
        if not (self.hub or self.url):
            raise ValueError(f"released model {self.name!r} names neither a hub repo nor a url")


@cache
def released_models() -> dict[str, ReleasedModel]:
    """Every registry entry, by name."""
    entries = yaml.safe_load(REGISTRY.read_text()) or {}
    known = {f.name for f in fields(ReleasedModel)}
    models = {}
    for name, entry in entries.items():
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(f"{REGISTRY}: entry {name!r} has unknown keys {unknown}; valid keys: {sorted(known)}")
        models[name] = ReleasedModel(name=name, **entry)
    return models


def released_model(name: str) -> ReleasedModel:
    """The registry entry `name`; an unknown name raises a ValueError listing the known ones."""
    models = released_models()
    if name not in models:
        raise ValueError(f"released={name!r} is not in the registry ({REGISTRY.name}); known: {', '.join(models)}")
    return models[name]
