"""`get_anchors`: one entry point that finds a concept's anchor set, in this order (source="auto"):

1. an explicit reviewed file (`anchors_file=`);
2. the built-in set shipped in `stereo/anchors/data/`;
3. a reviewed file at `<cache_dir>/<concept>.txt` (e.g. written by the CLI's `out=` and edited);
4. a cached OpenAI reply for (model, template, concept, n);
5. a new OpenAI request, only if OPENAI_API_KEY is set (or the generator has a client).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from stereo.anchors.cache import AnchorCache, AnchorRequest
from stereo.anchors.concepts import resolve_concept
from stereo.anchors.files import (
    builtin_anchor_path,
    builtin_concepts,
    load_anchor_file,
    load_builtin_anchors,
)
from stereo.anchors.generate import AnchorGenerator

__all__ = ["DEFAULT_N", "SOURCES", "get_anchors", "reviewed_anchor_path"]

log = logging.getLogger(__name__)

SOURCES = ("auto", "builtin", "file", "cache", "openai")
DEFAULT_N = 100  # anchors generated when n is not given (the reference ships 50-200)


def reviewed_anchor_path(concept: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where get_anchors looks for a user-reviewed anchor file: `<cache_dir>/<concept key>.txt`."""
    return AnchorCache(cache_dir).root / f"{resolve_concept(concept).key}.txt"


def get_anchors(
    concept: str,
    n: int | None = None,
    source: str = "auto",
    *,
    anchors_file: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    generator: AnchorGenerator | None = None,
) -> list[str]:
    """Anchor prompts for `concept` (a key like "garbage_truck" or text like "garbage truck").

    source: "auto" (see module docstring), "builtin", "file" (`anchors_file` or the reviewed
    path), "cache" (cached OpenAI reply only; never sends a request) or "openai" (cached reply,
    else a new request whose result is cached). n: how many; None means the whole file/built-in
    set, or DEFAULT_N for generation. Files and built-in sets return their first n prompts.
    generator: model, template, client, validation rules and retry policy of generation
    (default `AnchorGenerator()`); its model and template are part of the cache key.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown anchor source {source!r}; valid sources are {SOURCES}")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"n (number of anchors) must be a positive integer or None, got {n!r}")
    if anchors_file is not None and source not in ("auto", "file"):
        raise ValueError(f"anchors_file= is read by source='auto' or 'file', not source={source!r}")
    resolved = resolve_concept(concept)
    key = resolved.key
    reviewed = Path(anchors_file).expanduser() if anchors_file else reviewed_anchor_path(key, cache_dir)
    generator = generator if generator is not None else AnchorGenerator()
    request = AnchorRequest(key, n or DEFAULT_N, generator.model, generator.template)
    cache = AnchorCache(cache_dir)

    if source == "builtin" or (source == "auto" and not anchors_file and builtin_anchor_path(key)):
        return _first_n(load_builtin_anchors(key), n, f"built-in set for {key!r}")
    if source == "file" or (source == "auto" and (anchors_file or reviewed.exists())):
        return _first_n(load_anchor_file(reviewed), n, f"anchor file {reviewed}")
    cached = cache.load(request)  # source is now "auto", "cache" or "openai"
    if cached is not None:
        log.info("anchors for %r loaded from cache %s", key, cache.path(request))
        return cached
    if source == "cache":
        raise LookupError(
            f"no cached anchors for concept {key!r} with n={request.n}, model={request.model!r} and "
            f"this template in {cache.root}. Use source='openai' to generate them."
        )
    if source == "auto" and generator.client is None and not os.environ.get("OPENAI_API_KEY"):
        raise LookupError(_missing_anchors_message(concept, key, reviewed))
    prompts = generator.generate(resolved, request.n)
    path = cache.save(request, prompts)
    log.info("generated %d anchors for %r; cached at %s (review them there)", len(prompts), key, path)
    return prompts


def _first_n(prompts: list[str], n: int | None, what: str) -> list[str]:
    if n is None:
        return prompts
    if n > len(prompts):
        raise ValueError(
            f"asked for n={n} anchors but the {what} has only {len(prompts)}; ask for "
            f"n<={len(prompts)}, or generate a larger set with source='openai'."
        )
    return prompts[:n]


def _missing_anchors_message(concept: str, key: str, reviewed: Path) -> str:
    return (
        f"no anchors for concept {concept!r}: it has no built-in set, no reviewed file and no "
        "cached set, and OPENAI_API_KEY is not set. Fix it in one of three ways:\n"
        f"  1. use a built-in concept: {builtin_concepts()};\n"
        f"  2. put a reviewed anchor file (one prompt per line, '#' comments) at {reviewed}, "
        "or pass anchors_file=PATH;\n"
        "  3. set OPENAI_API_KEY to generate a set with an OpenAI model (it is cached and "
        f"reusable without a key): python -m stereo.anchors concept=\"{key.replace('_', ' ')}\""
    )
