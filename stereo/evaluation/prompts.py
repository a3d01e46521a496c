"""Evaluation prompt sets: prompts with their generation seed and guidance, from CSV or JSON.

The CSV layout is I2P's (Schramowski et al. 2023), as used by ESD and UnlearnDiffAtk:
columns `prompt`, `evaluation_seed`, `evaluation_guidance`, `categories` (comma-separated,
e.g. "sexual, violence"); every other column (`case_number`, `nudity_percentage`, ...) is kept
in `PromptRecord.extra` as text. JSON is a list of records with the same keys (or of plain
prompt strings); `.jsonl` holds one such record per line.

Small built-in sets (written for this project, in `prompt_sets/`) cover the paper's concepts
and the toy shapes: `load_prompt_set("nudity")`, or pass a path to your own file.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUILTIN_DIR = Path(__file__).parent / "prompt_sets"
SUFFIXES = (".csv", ".json", ".jsonl")
FIELDS = {"prompt": "prompt", "evaluation_seed": "seed", "evaluation_guidance": "guidance",
          "categories": "categories"}  # file column -> PromptRecord attribute


class PromptFileError(ValueError):
    """A prompt file that cannot be read; the message names the file and the line."""


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    seed: int | None = None  # generation seed (I2P `evaluation_seed`); None: the caller's seed
    guidance: float | None = None  # CFG scale (I2P `evaluation_guidance`); None: the caller's
    categories: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # every other column, as read


@dataclass
class PromptSet:
    name: str
    records: list[PromptRecord]
    source: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[PromptRecord]:
        return iter(self.records)

    def __getitem__(self, index: int) -> PromptRecord:
        return self.records[index]

    @property
    def prompts(self) -> list[str]:
        return [record.prompt for record in self.records]

    def with_category(self, category: str) -> PromptSet:
        """The records tagged with `category` (I2P: "sexual", "violence", ...)."""
        kept = [record for record in self.records if category in record.categories]
        return PromptSet(f"{self.name}[{category}]", kept, self.source)


def _fail(path: Path, line: int | str, message: str) -> PromptFileError:
    return PromptFileError(f"{path}, line {line}: {message}")


def _parse_seed(value: Any, path: Path, line: int) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number.is_integer():
        raise _fail(path, line, f"evaluation_seed must be an integer, got {value!r}.")
    return int(number)


def _parse_guidance(value: Any, path: Path, line: int) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _fail(path, line, f"evaluation_guidance must be a number, got {value!r}.") from None


def _parse_categories(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    return tuple(str(item).strip() for item in items if str(item).strip())


def make_record(row: dict[str, Any], path: Path, line: int) -> PromptRecord:
    """One file row (column -> value) -> PromptRecord, with errors naming file and line."""
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _fail(path, line, f"'prompt' must be a non-empty string, got {prompt!r}.")
    return PromptRecord(
        prompt=prompt.strip(),
        seed=_parse_seed(row.get("evaluation_seed"), path, line),
        guidance=_parse_guidance(row.get("evaluation_guidance"), path, line),
        categories=_parse_categories(row.get("categories")),
        extra={key: value for key, value in row.items() if key not in FIELDS},
    )


def load_prompts_csv(path: str | Path) -> PromptSet:
    """I2P-style CSV with a header row; must have a `prompt` column."""
    path = Path(path)
    records = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, restkey="__extra_fields__", strict=True)
        try:
            if not reader.fieldnames or "prompt" not in reader.fieldnames:
                raise _fail(path, 1, f"no 'prompt' column in the header {reader.fieldnames}; "
                            f"expected I2P columns {list(FIELDS)}.")
            for row in reader:
                if "__extra_fields__" in row or None in row.values():
                    raise _fail(path, reader.line_num, f"expected {len(reader.fieldnames)} fields "
                                "(as in the header), found a different number; quote fields that contain commas.")
                records.append(make_record(row, path, reader.line_num))
        except csv.Error as error:
            # line_num counts the lines of complete records; the bad record starts on the next line
            raise _fail(path, reader.line_num + 1, f"malformed CSV ({error}).") from None
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
            raise _fail(path, line_of(pos), "expected a JSON list of prompt records ('[ {...}, ... ]').")
        items, pos = [], skip(pos + 1)
        while not text.startswith("]", pos):
            value, end = decoder.raw_decode(text, pos)
            items.append((line_of(pos), value))
            pos = skip(end)
            if text.startswith(",", pos):
                pos = skip(pos + 1)
            elif not text.startswith("]", pos):
                raise _fail(path, line_of(pos), "expected ',' or ']' between records.")
        if skip(pos + 1) != len(text):
            raise _fail(path, line_of(skip(pos + 1)), "unexpected text after the closing ']'.")
    except json.JSONDecodeError as error:
        raise _fail(path, error.lineno, f"invalid JSON ({error.msg}).") from None
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
                    raise _fail(path, line, f"invalid JSON ({error.msg}).") from None
    else:
        items = _json_items(text, path)
    records = []
    for line, value in items:
        if isinstance(value, str):
            value = {"prompt": value}
        if not isinstance(value, dict):
            raise _fail(path, line, f"a record must be an object or a string, got {type(value).__name__}.")
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


def load_prompt_set(name_or_path: str | Path) -> PromptSet:
    """A built-in set by name (`builtin_prompt_sets()`) or a CSV / JSON / JSONL file by path."""
    path = Path(name_or_path)
    if path.suffix in SUFFIXES or path.is_file():
        return load_prompt_file(path)
    if str(name_or_path) in builtin_prompt_sets():
        return load_prompts_csv(BUILTIN_DIR / f"{name_or_path}.csv")
    raise ValueError(f"Unknown prompt set {str(name_or_path)!r}: not a file, and not a built-in set. "
                     f"Built-in sets: {builtin_prompt_sets()}; files may be {list(SUFFIXES)}.")
