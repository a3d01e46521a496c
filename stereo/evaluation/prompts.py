"""Evaluation prompt sets: prompts with their generation seed and guidance, from CSV or JSON.

The CSV layout is I2P's (Schramowski et al. 2023), as used by ESD and UnlearnDiffAtk:
columns `prompt`, `evaluation_seed`, `evaluation_guidance`, `categories` (comma-separated,
e.g. "sexual, violence"); every other column (`case_number`, `nudity_percentage`, ...) is kept
in `PromptRecord.extra` as text. JSON is a list of records with the same keys (or of plain
prompt strings); `.jsonl` holds one such record per line.

Small built-in sets (written for this project, in `prompt_sets/`) cover the paper's concepts
and the toy shapes: `load_prompt_set("nudity")`, or pass a path to your own file. The standard
sets of the literature (`i2p`, `i2p_nudity`, `unlearndiffatk_nudity`, `coco10k`, ...) are loaded by
name too, from a manifest that pins their source and checksum (`stereo.evaluation.prompt_sets.standard`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stereo.evaluation.prompt_sets.records import (  # noqa: F401 (PromptRecord: part of this module's API)
    FIELDS,
    PromptFileError,
    PromptRecord,
    PromptSet,
    file_error,
    make_record,
)

BUILTIN_DIR = Path(__file__).parent / "prompt_sets"
SUFFIXES = (".csv", ".json", ".jsonl")


def load_prompts_csv(path: str | Path) -> PromptSet:
    """I2P-style CSV with a header row; must have a `prompt` column."""
    path = Path(path)
    records = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, restkey="__extra_fields__", strict=True)
        try:
            if not reader.fieldnames or "prompt" not in reader.fieldnames:
                raise file_error(path, 1, f"no 'prompt' column in the header {reader.fieldnames}; "
                            f"expected I2P columns {list(FIELDS)}.")
            for row in reader:
                if "__extra_fields__" in row or None in row.values():
                    raise file_error(path, reader.line_num, f"expected {len(reader.fieldnames)} fields "
                                "(as in the header), found a different number; quote fields that contain commas.")
                records.append(make_record(row, path, reader.line_num))
        except csv.Error as error:
            # line_num counts the lines of complete records; the bad record starts on the next line
            raise file_error(path, reader.line_num + 1, f"malformed CSV ({error}).") from None
    return PromptSet(path.stem, records, str(path))


def _json_items(text: str, path: Path) -> list[tuple[int, Any]]:
    """(line, value) for each element of a top-level JSON list, so errors can name lines."""
    decoder = json.JSONDecoder()

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        return pos

    try:
        pos = skip(0)
        if not text.startswith("[", pos):
            raise file_error(path, line_of(pos), "expected a JSON list of prompt records ('[ {...}, ... ]').")
        items, pos = [], skip(pos + 1)
        while not text.startswith("]", pos):
            value, end = decoder.raw_decode(text, pos)
            items.append((line_of(pos), value))
            pos = skip(end)
            if text.startswith(",", pos):
                pos = skip(pos + 1)
            elif not text.startswith("]", pos):
                raise file_error(path, line_of(pos), "expected ',' or ']' between records.")
        if skip(pos + 1) != len(text):
            raise file_error(path, line_of(skip(pos + 1)), "unexpected text after the closing ']'.")
    except json.JSONDecodeError as error:
        raise file_error(path, error.lineno, f"invalid JSON ({error.msg}).") from None
    return items


def load_prompts_json(path: str | Path) -> PromptSet:
    """A JSON list (`.json`) or one record per line (`.jsonl`); a record is an object or a string."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        items = []
        for line, raw in enumerate(text.splitlines(), start=1):
            if raw.strip():
                try:
                    items.append((line, json.loads(raw)))
                except json.JSONDecodeError as error:
                    raise file_error(path, line, f"invalid JSON ({error.msg}).") from None
    else:
        items = _json_items(text, path)
    records = []
    for line, value in items:
        if isinstance(value, str):
            value = {"prompt": value}
        if not isinstance(value, dict):
            raise file_error(path, line, f"a record must be an object or a string, got {type(value).__name__}.")
        records.append(make_record(value, path, line))
    return PromptSet(path.stem, records, str(path))


def builtin_prompt_sets() -> list[str]:
    """Names of the prompt sets shipped with the package."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.csv"))


def load_prompt_file(path: str | Path) -> PromptSet:
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"Unknown prompt file type {path.suffix!r} ({path}); valid: {list(SUFFIXES)}.")
    if not path.is_file():
        raise FileNotFoundError(f"Prompt file {path} does not exist.")
    return load_prompts_csv(path) if path.suffix == ".csv" else load_prompts_json(path)


def load_prompt_set(name_or_path: str | Path, paths: Mapping[str, str | Path] | None = None) -> PromptSet:
    """A CSV / JSON / JSONL file by path, a built-in set by name (`builtin_prompt_sets()`) or a standard
    set by name (`standard_prompt_sets()`, fetched and verified; `paths`: local files of standard sets)."""
    from stereo.evaluation.prompt_sets.standard import load_standard_set, standard_prompt_sets

    path = Path(name_or_path)
    if path.suffix in SUFFIXES or path.is_file():
        return load_prompt_file(path)
    if str(name_or_path) in builtin_prompt_sets():
        return load_prompts_csv(BUILTIN_DIR / f"{name_or_path}.csv")
    if str(name_or_path) in standard_prompt_sets():
        return load_standard_set(str(name_or_path), (paths or {}).get(str(name_or_path)))
    raise ValueError(f"Unknown prompt set {str(name_or_path)!r}: not a file, not a built-in set and not a standard "
                     f"set. Built-in sets: {builtin_prompt_sets()}; standard sets: {standard_prompt_sets()}; "
                     f"files may be {list(SUFFIXES)}.")
