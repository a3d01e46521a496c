"""Disk cache of generated anchor sets: one JSON file per request, keyed by the sha256 of
(model, template, concept, n). Cached sets are reviewable and reusable without an API key."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from stereo import __version__
from stereo.manifest import write_text_atomic

__all__ = ["AnchorCache", "AnchorRequest", "default_cache_dir"]

CACHE_FORMAT = "stereo.anchors.cache.v1"


def default_cache_dir() -> Path:
    """`$STEREO_CACHE_DIR/anchors` if STEREO_CACHE_DIR is set, else `~/.cache/stereo/anchors`."""
    root = os.environ.get("STEREO_CACHE_DIR")
    root = Path(root).expanduser() if root else Path.home() / ".cache" / "stereo"
    return root / "anchors"


@dataclass(frozen=True)
class AnchorRequest:
    """What was asked of the LLM: everything that changes the answer, and nothing secret."""

    concept: str  # concept key, e.g. "garbage_truck"
    n: int
    model: str
    template: str

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n (number of anchors) must be a positive integer, got {self.n!r}")

    @property
    def digest(self) -> str:
        """sha256 of the request fields, as canonical JSON."""
        fields = {"model": self.model, "template": self.template, "concept": self.concept, "n": self.n}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8")).hexdigest()


class AnchorCache:
    """Folder of `<concept>.<sha256>.json` files, each holding one request's prompts + metadata."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def __repr__(self) -> str:
        return f"AnchorCache(root={str(self.root)!r})"

    def path(self, request: AnchorRequest) -> Path:
        return self.root / f"{request.concept}.{request.digest}.json"

    def load(self, request: AnchorRequest) -> list[str] | None:
        """The cached prompts for this request, or None on a cache miss."""
        path = self.path(request)
        if not path.exists():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            prompts = entry["prompts"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"anchor cache file {path} is unreadable or corrupt ({err!r}); delete it to "
                "generate the set again."
            ) from err
        if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
            raise ValueError(
                f"anchor cache file {path} has no list of prompt strings under 'prompts'; "
                "delete it to generate the set again."
            )
        return prompts

    def save(self, request: AnchorRequest, prompts: list[str]) -> Path:
        """Write the entry atomically (temp file + rename) and return its path."""
        entry = {
            "format": CACHE_FORMAT,
            "sha256": request.digest,
            "concept": request.concept,
            "n": request.n,
            "model": request.model,
            "template": request.template,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "stereo_version": __version__,
            "prompts": list(prompts),
        }
        path = self.path(request)
        write_text_atomic(path, json.dumps(entry, indent=2, ensure_ascii=False) + "\n")
        return path
