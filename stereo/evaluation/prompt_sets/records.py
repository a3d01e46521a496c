"""Prompt records: one evaluation prompt with its seed, CFG scale and categories, and one file row -> record.

Shared by the file loaders (`stereo.evaluation.prompts`) and the standard sets
(`stereo.evaluation.prompt_sets.standard`); errors name the file and the line.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    provenance: dict[str, Any] = field(default_factory=dict)  # a standard set's URL, sha256, selection

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
        return PromptSet(f"{self.name}[{category}]", kept, self.source, self.provenance)


def file_error(path: Path, line: int | str, message: str) -> PromptFileError:
    return PromptFileError(f"{path}, line {line}: {message}")


def _parse_seed(value: Any, path: Path, line: int) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number.is_integer():
        raise file_error(path, line, f"evaluation_seed must be an integer, got {value!r}.")
    return int(number)


def _parse_guidance(value: Any, path: Path, line: int) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise file_error(path, line, f"evaluation_guidance must be a number, got {value!r}.") from None


def _parse_categories(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    return tuple(str(item).strip() for item in items if str(item).strip())


def make_record(row: dict[str, Any], path: Path, line: int) -> PromptRecord:
    """One file row (column -> value) -> PromptRecord, with errors naming file and line."""
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise file_error(path, line, f"'prompt' must be a non-empty string, got {prompt!r}.")
    return PromptRecord(
        prompt=prompt.strip(),
        seed=_parse_seed(row.get("evaluation_seed"), path, line),
        guidance=_parse_guidance(row.get("evaluation_guidance"), path, line),
        categories=_parse_categories(row.get("categories")),
        extra={key: value for key, value in row.items() if key not in FIELDS},
    )
