"""Anchor files: one prompt per line, '#' starts a comment line. The built-in sets ship as
versioned files `data/<concept>.v<N>.txt`; reviewed sets written by users use the same format."""

from __future__ import annotations

import os
import re
from pathlib import Path

from stereo.anchors.concepts import resolve_concept
from stereo.manifest import write_text_atomic

__all__ = [
    "DATA_DIR",
    "builtin_anchor_path",
    "builtin_concepts",
    "load_anchor_file",
    "load_builtin_anchors",
    "write_anchor_file",
]

DATA_DIR = Path(__file__).parent / "data"
_BUILTIN_NAME = re.compile(r"^(?P<key>[a-z0-9_]+)\.v(?P<version>\d+)\.txt$")


def load_anchor_file(path: str | os.PathLike) -> list[str]:
    """Read anchors from a text file: one prompt per line; blank lines and lines starting with
    '#' are skipped; surrounding whitespace is stripped. Prompts are otherwise kept as written."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(
            f"cannot read anchor file {path}: {err}. Expected a UTF-8 text file with one prompt "
            "per line ('#' for comments)."
        ) from err
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(
            f"anchor file {path} has no prompts (only blank or '#' comment lines). "
            "Write one prompt per line."
        )
    return prompts


def write_anchor_file(path: str | os.PathLike, prompts: list[str], header: list[str] = ()) -> Path:
    """Write prompts one per line after '#' header lines, atomically (temp file + rename)."""
    path = Path(path).expanduser()
    bad = [p for p in prompts if "\n" in p or p.strip().startswith("#") or not p.strip()]
    if bad:
        raise ValueError(f"prompts cannot be empty, contain newlines or start with '#': {bad[:3]}")
    lines = [f"# {h}" for h in header] + list(prompts)
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def _builtin_files() -> dict[str, Path]:
    """{concept key: path of the highest version of its built-in file}."""
    best: dict[str, tuple[int, Path]] = {}
    for path in DATA_DIR.glob("*.txt"):
        match = _BUILTIN_NAME.match(path.name)
        if match:
            key, version = match["key"], int(match["version"])
            if key not in best or version > best[key][0]:
                best[key] = (version, path)
    return {key: path for key, (_, path) in sorted(best.items())}


def builtin_concepts() -> list[str]:
    """Keys of the concepts that ship with a built-in anchor set."""
    return list(_builtin_files())


def builtin_anchor_path(concept: str) -> Path | None:
    """Path of the newest built-in anchor file for the concept, or None if there is none."""
    return _builtin_files().get(resolve_concept(concept).key)


def load_builtin_anchors(concept: str) -> list[str]:
    """The built-in anchor set of a concept (newest version)."""
    path = builtin_anchor_path(concept)
    if path is None:
        raise ValueError(
            f"no built-in anchor set for concept {concept!r}; built-in concepts are "
            f"{builtin_concepts()}"
        )
    return load_anchor_file(path)
