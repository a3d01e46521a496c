"""Standard prompt sets by name (`prompts=i2p`): one manifest per set, the file fetched once into a cache, verified.

A manifest (`manifests/<name>.json`) gives the file's URL (pinned to a commit), its licence, its sha256
and row count, which file columns hold the prompt / seed / CFG scale / categories, a row filter, the
de-duplication rule and the number of prompts that results. Loading checks every one of them, so
`i2p_nudity` is the same 95 prompts, with the same seeds, as in the paper that defined it. A manifest
whose `sha256` is null is unverified: the checksum of the first download is recorded beside the
cached file and checked from then on (with a warning each time the set is loaded).

Where the file comes from, first match wins:
  1. a local file: `paths={name: file}` (evaluate.yaml `prompt_sets.<name>.path=/data/i2p.csv`) or the
     environment variable STEREO_PROMPT_SET_<NAME> (e.g. STEREO_PROMPT_SET_I2P=/data/i2p.csv);
  2. the cache: $STEREO_CACHE/prompt_sets, else ~/.cache/stereo/prompt_sets;
  3. a download (urllib), unless offline: STEREO_OFFLINE=1, or HF_HUB_OFFLINE=1 for a huggingface.co URL.
A download is written to a temporary file and cached only once its checksum, columns and row count
are right; a local file must pass the same checks (load it by path, `prompts=/data/file.csv`, to read
a file of your own as it is).

Over 300 lines: the manifest schema, where the file comes from and every check, in one place.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from stereo.evaluation.prompt_sets.records import FIELDS, PromptFileError, PromptSet, make_record
from stereo.manifest import sha256_file

log = logging.getLogger(__name__)
MANIFEST_DIR = Path(__file__).parent / "manifests"
DEDUPE = ("none", "prompt", "prompt_seed")  # keep every row | first row of each prompt | of each (prompt, seed)
OPS = (">", ">=", "<", "<=", "==", "contains")  # `contains`: one of the comma-separated items of the column


class PromptSetError(ValueError):
    """A standard prompt set that cannot be had or does not match its manifest; the message says what to do."""


@dataclass(frozen=True)
class RowFilter:
    column: str  # a column of the file
    op: str  # one of OPS
    value: Any

    def keep(self, row: Mapping[str, str]) -> bool:
        text = row.get(self.column) or ""
        if self.op == "contains":
            return str(self.value) in [item.strip() for item in text.split(",")]
        try:
            number, value = float(text or "nan"), float(self.value)
        except ValueError:
            raise PromptSetError(f"filter {self}: column {self.column!r} holds {text!r}, not a number") from None
        return {">": number > value, ">=": number >= value, "<": number < value, "<=": number <= value,
                "==": number == value}[self.op]

    def __str__(self) -> str:
        return f"{self.column} {self.op} {self.value}"


@dataclass(frozen=True)
class PromptSetManifest:
    """What `manifests/<name>.json` holds (see the module docstring); `check()` validates it."""

    name: str
    title: str
    url: str
    sha256: str | None  # None: unverified, recorded at first download
    checksum: str  # how the checksum was obtained ("verified: ..." / "unverified: ...")
    licence: str
    origin: str  # where the file comes from and how it was made
    rows: int  # data rows of the file
    columns: dict[str, str]  # PromptRecord field (prompt, evaluation_seed, ...) -> file column
    filter: list[RowFilter] = field(default_factory=list)  # rows kept: all filters true
    dedupe: str = "none"
    n: int = 0  # prompts after filter and de-duplication
    notes: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> PromptSetManifest:
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(data) - known), sorted(k for k in ("name", "url", "rows", "columns", "n")
                                                             if k not in data)
        if unknown or missing:
            raise PromptSetError(f"{where}: unknown keys {unknown}, missing keys {missing}; "
                                 f"valid keys: {sorted(known)}")
        values = {**{"title": "", "sha256": None, "checksum": "", "licence": "", "origin": ""}, **data}
        values["filter"] = [RowFilter(**f) for f in data.get("filter") or []]
        manifest = cls(**values)
        manifest.check(where)
        return manifest

    def check(self, where: str) -> None:
        if "prompt" not in self.columns or set(self.columns) - set(FIELDS):
            raise PromptSetError(f"{where}: columns {self.columns} must map 'prompt' (and only {list(FIELDS)}) "
                                 "to the file's column names")
        if self.dedupe not in DEDUPE:
            raise PromptSetError(f"{where}: dedupe={self.dedupe!r}; valid: {list(DEDUPE)}")
        bad = [str(f) for f in self.filter if f.op not in OPS]
        if bad:
            raise PromptSetError(f"{where}: filters {bad} use an unknown operator; valid: {list(OPS)}")
        if self.sha256 is not None and (len(self.sha256) != 64 or set(self.sha256) - set("0123456789abcdef")):
            raise PromptSetError(f"{where}: sha256 must be 64 lowercase hex digits or null, got {self.sha256!r}")

    @property
    def env_var(self) -> str:
        return f"STEREO_PROMPT_SET_{self.name.upper()}"

    def describe(self, sha256: str | None) -> dict[str, Any]:
        """The provenance a report records: source, checksum (and whether it was verified), selection."""
        return {"name": self.name, "url": self.url, "sha256": sha256, "verified": self.sha256 is not None,
                "licence": self.licence, "rows": self.rows, "filter": [str(f) for f in self.filter],
                "dedupe": self.dedupe, "n": self.n}


def standard_prompt_sets() -> list[str]:
    """Names of the standard sets (those with a manifest)."""
    return sorted(p.stem for p in MANIFEST_DIR.glob("*.json"))


def read_manifest(name: str) -> PromptSetManifest:
    path = MANIFEST_DIR / f"{name}.json"
    if not path.is_file():
        raise PromptSetError(f"no manifest for prompt set {name!r} ({path}); standard sets: {standard_prompt_sets()}")
    manifest = PromptSetManifest.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))
    if manifest.name != name:
        raise PromptSetError(f"{path} names the set {manifest.name!r}, not {name!r}")
    return manifest


# --- where the file is ---------------------------------------------------------------------------
def cache_dir() -> Path:
    root = os.environ.get("STEREO_CACHE")
    return Path(root) / "prompt_sets" if root else Path.home() / ".cache" / "stereo" / "prompt_sets"


def cached_path(manifest: PromptSetManifest) -> Path:
    """The cached copy of the manifest's URL (sets filtered from one file share it)."""
    key = hashlib.sha256(manifest.url.encode()).hexdigest()[:16]
    return cache_dir() / key / (manifest.url.rsplit("/", 1)[-1] or "prompts.csv")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline_reason(url: str) -> str | None:
    """Why no download may be tried (None: it may)."""
    if _truthy("STEREO_OFFLINE"):
        return "STEREO_OFFLINE is set"
    if "huggingface.co" in url and _truthy("HF_HUB_OFFLINE"):
        return "HF_HUB_OFFLINE is set"
    return None


def _how_to_provide(manifest: PromptSetManifest) -> str:
    checksum = f"sha256 {manifest.sha256}" if manifest.sha256 else "no sha256 known (unverified set)"
    return (f"Download {manifest.url} ({checksum}, {manifest.rows} rows) where there is network, then give it with "
            f"prompt_sets.{manifest.name}.path=/path/to/file.csv or {manifest.env_var}=/path/to/file.csv, "
            f"or copy it to {cached_path(manifest)}.")


def _recorded_sha256(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _download(manifest: PromptSetManifest, target: Path, timeout: float = 60.0) -> None:
    """Fetch the URL into a temporary file beside `target`; it becomes `target` only once it passes `verify`."""
    reason = offline_reason(manifest.url)
    if reason:
        raise PromptSetError(f"prompt set {manifest.name!r} is not cached ({target}) and downloads are off "
                             f"({reason}). {_how_to_provide(manifest)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out:
            try:
                with urllib.request.urlopen(manifest.url, timeout=timeout) as response:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
            except (urllib.error.URLError, OSError) as error:
                raise PromptSetError(f"prompt set {manifest.name!r}: downloading {manifest.url} failed ({error}). "
                                     f"{_how_to_provide(manifest)}") from None
        digest = verify(manifest, Path(temporary), manifest.sha256, what="the download of")[1]
        os.replace(temporary, target)
        if manifest.sha256 is None:
            _recorded_sha256(target).write_text(digest + "\n")
            _warn_unverified(manifest, f"recorded sha256 {digest} of the first download")
        log.info("prompt set %s: %s downloaded to %s", manifest.name, manifest.url, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _warn_unverified(manifest: PromptSetManifest, what: str) -> None:
    message = (f"PROMPT SET {manifest.name!r} IS UNVERIFIED: its manifest has no sha256 ({manifest.checksum}); "
               f"{what}. Compare it with the file the paper used before trusting numbers on it.")
    log.warning(message)
    warnings.warn(message, stacklevel=3)


def locate(manifest: PromptSetManifest, path: str | Path | None = None) -> tuple[Path, str | None, str]:
    """(file, the sha256 it must have (None: unchecked), where it came from)."""
    local = path or os.environ.get(manifest.env_var)
    if local:
        local = Path(local).expanduser()
        if not local.is_file():
            raise PromptSetError(f"prompt set {manifest.name!r}: the local file {local} does not exist "
                                 f"(given by {'prompt_sets.' + manifest.name + '.path' if path else manifest.env_var})")
        if manifest.sha256 is None:
            _warn_unverified(manifest, f"the local file {local} is not checked")
        return local, manifest.sha256, f"local file {local}"
    cached = cached_path(manifest)
    downloaded = not cached.is_file()
    if downloaded:
        _download(manifest, cached)  # warns itself when unverified
    expected = manifest.sha256
    if expected is None:
        recorded = _recorded_sha256(cached)
        if not recorded.is_file():  # copied into the cache by hand: this first use records its checksum
            recorded.write_text(sha256_file(cached) + "\n")
        expected = recorded.read_text().strip()
        if not downloaded:
            _warn_unverified(manifest, f"the cached file is checked against the sha256 recorded at its first "
                                       f"download ({expected})")
    return cached, expected, f"cache {cached}"


# --- reading and checking ------------------------------------------------------------------------------
def _read_rows(manifest: PromptSetManifest, path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line, row) of every data row, after checking the header has the manifest's columns."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        missing = [column for column in manifest.columns.values() if column not in header]
        if missing:
            raise PromptSetError(f"{path} is not the file of prompt set {manifest.name!r}: its header {header} lacks "
                                 f"the columns {missing} that the manifest maps ({manifest.columns})")
        rows = []
        try:
            for row in reader:
                if None in row or None in row.values():
                    raise PromptFileError(f"{path}, line {reader.line_num}: expected {len(header)} fields (as in the "
                                          "header), found a different number.")
                rows.append((reader.line_num, row))
        except csv.Error as error:
            raise PromptFileError(f"{path}, line {reader.line_num + 1}: malformed CSV ({error}).") from None
        return rows


def verify(manifest: PromptSetManifest, path: Path, expected_sha256: str | None,
           what: str = "") -> tuple[list[tuple[int, dict[str, str]]], str]:
    """The file's rows and sha256, after checking its checksum, columns and row count against the manifest."""
    digest = sha256_file(path)
    label = f"{what} {path}".strip() if what else str(path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise PromptSetError(f"prompt set {manifest.name!r}: {label} has sha256 {digest}, but {expected_sha256} is "
                             f"expected ({manifest.url}); the file is another version or damaged, and was not used. "
                             "To evaluate on a file of your own, give its path: prompts=/path/to/file.csv")
    rows = _read_rows(manifest, path)
    if len(rows) != manifest.rows:
        raise PromptSetError(f"prompt set {manifest.name!r}: {label} has {len(rows)} rows, the manifest expects "
                             f"{manifest.rows}")
    return rows, digest


def select(manifest: PromptSetManifest, rows: list[tuple[int, dict[str, str]]], path: Path) -> PromptSet:
    """Filter, map the columns to PromptRecord fields, de-duplicate; the result must have `manifest.n` prompts."""
    mapped_columns = set(manifest.columns.values())
    records, seen = [], set()
    for line, row in rows:
        if not all(f.keep(row) for f in manifest.filter):
            continue
        values = {k: v for k, v in row.items() if k not in mapped_columns and k not in FIELDS}
        values.update({name: row[column] for name, column in manifest.columns.items()})
        record = make_record(values, path, line)
        key = {"none": line, "prompt": record.prompt, "prompt_seed": (record.prompt, record.seed)}[manifest.dedupe]
        if key not in seen:
            seen.add(key)
            records.append(record)
    if len(records) != manifest.n:
        raise PromptSetError(f"prompt set {manifest.name!r}: {len(records)} prompts after the filter "
                             f"{[str(f) for f in manifest.filter]} and dedupe={manifest.dedupe!r}, the manifest "
                             f"expects {manifest.n}")
    return PromptSet(manifest.name, records)


def load_standard_set(name: str, path: str | Path | None = None) -> PromptSet:
    """The standard set `name`, from `path` / its environment variable / the cache / a download, verified."""
    manifest = read_manifest(name)
    file, expected, origin = locate(manifest, path)
    rows, digest = verify(manifest, file, expected)
    prompt_set = select(manifest, rows, file)
    prompt_set.provenance = {**manifest.describe(digest), "file": origin}
    selection = f", {' and '.join(str(f) for f in manifest.filter)}" if manifest.filter else ""
    prompt_set.source = (f"{name} ({manifest.url}, sha256 {digest}{'' if manifest.sha256 else ' UNVERIFIED'}"
                         f"{selection}: {manifest.n} of {manifest.rows} rows)")
    return prompt_set


def local_paths(settings: Mapping[str, Any] | None) -> dict[str, str]:
    """`prompt_sets` of evaluate.yaml ({name: {path: file}}) -> {name: file}, every name and key checked."""
    paths = {}
    for name, entry in (settings or {}).items():
        entry = dict(entry or {})
        if name not in standard_prompt_sets() or set(entry) - {"path"}:
            raise PromptSetError(f"prompt_sets.{name} = {entry}: give prompt_sets.<name>.path=/file.csv for a standard "
                                 f"set; standard sets: {standard_prompt_sets()}")
        if entry.get("path"):
            paths[name] = str(entry["path"])
    return paths
