"""Files of released erased models, from the Hugging Face Hub or a local path, with a record of what was loaded.

`fetch(HubSource(repo, filename=..., subfolder=..., revision=..., sha256=...))` gives the local path and a
provenance record (repo, file, requested revision, resolved commit, path, sha256) for the report's manifest:

- `repo` "org/name": one file (`filename`, under `subfolder` if set) via `hf_hub_download`, or a whole
  folder (`subfolder` alone, e.g. a CLIPTextModel or diffusers UNet folder) via `snapshot_download` with
  `allow_patterns`. The HF cache is tried first, without network; `revision` pins a branch, tag or commit
  (unset: `main`, and the commit it resolved to is recorded). `HF_ENDPOINT` picks the server.
- `repo` a local file: used as it is; a local folder: `repo/subfolder/filename` (so the folder made by
  `hf download ... --local-dir DIR` works with the same `subfolder`/`filename`).

The sha256 of what was loaded is always computed (a folder's: over its files' relative paths and
digests, `sha256_of`); an expected `sha256` that differs raises. Offline or unreachable and not cached:
a `ModelLoadError` naming the repo, file and revision, and how to provide the file locally.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stereo.manifest import sha256_file
from stereo.models.loading import ModelLoadError, hub_reachable, looks_like_path


@dataclass(frozen=True)
class HubSource:
    """Where a released checkpoint lives."""

    repo: str  # hub id "org/name", or a local file / folder
    filename: str | None = None  # one file of the repo (under `subfolder` if set)
    subfolder: str | None = None  # a folder of the repo; without `filename`: that whole folder
    revision: str | None = None  # branch, tag or commit of a hub repo; None: main
    sha256: str | None = None  # expected digest of what is loaded (a folder: `sha256_of`)

    @property
    def path_in_repo(self) -> str:
        return "/".join(part.strip("/") for part in (self.subfolder, self.filename) if part)


@dataclass(frozen=True)
class Fetched:
    path: Path  # the local file or folder to load
    record: dict[str, Any]  # provenance for the manifest


def fetch(source: HubSource) -> Fetched:
    """The local path of `source` (downloaded into the HF cache if needed) and its provenance record."""
    local = Path(source.repo).expanduser()
    if local.exists():
        path, commit = _local_path(local, source), None
    elif looks_like_path(source.repo):
        raise ModelLoadError(f"{source.repo} does not exist; give a local file or folder, or a hub id 'org/name'")
    else:
        path = _from_hub(source)
        commit = _snapshot_commit(path)
    files = _folder_digests(path) if path.is_dir() else None
    digest = sha256_file(path) if files is None else _digest_of_folder(files)
    if source.sha256 and digest != source.sha256.lower():
        raise ModelLoadError(
            f"sha256 mismatch for {_describe(source)}: expected {source.sha256}, got {digest} ({path}). The file "
            "changed upstream (pin `revision` to the commit you meant) or is corrupt (delete it from the HF cache "
            "and fetch it again); if the new file is the one you want, update the expected sha256."
        )
    record = {"repo": source.repo, "file": source.path_in_repo or None, "revision": source.revision,
              "commit": commit, "path": str(path), "sha256": digest}
    if files is not None:
        record["files"] = files
    return Fetched(path, record)


def sha256_of(path: str | Path) -> str:
    """sha256 of a file; of a folder: of the sorted lines `<relative path> <file sha256>` of its files."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    return _digest_of_folder(_folder_digests(path))


def _digest_of_folder(files: dict[str, str]) -> str:
    lines = "".join(f"{name} {digest}\n" for name, digest in files.items())
    return hashlib.sha256(lines.encode()).hexdigest()


def _folder_digests(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p.relative_to(folder)))
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)  # .cache/ of --local-dir, .gitattributes


def _local_path(root: Path, source: HubSource) -> Path:
    if root.is_file():
        return root
    path = root / source.path_in_repo if source.path_in_repo else root
    if not path.exists():
        raise ModelLoadError(f"{path} does not exist (local folder {root} + {source.path_in_repo!r})")
    return path


def _describe(source: HubSource) -> str:
    where = f"{source.repo}/{source.path_in_repo}" if source.path_in_repo else source.repo
    return f"{where} (revision {source.revision or 'main'})"


def _download(source: HubSource, local_files_only: bool) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    kwargs = {"repo_id": source.repo, "revision": source.revision, "local_files_only": local_files_only,
              "endpoint": os.environ.get("HF_ENDPOINT")}
    if source.filename:
        return Path(hf_hub_download(filename=source.filename, subfolder=source.subfolder, **kwargs))
    sub = source.subfolder.strip("/") if source.subfolder else None
    root = Path(snapshot_download(allow_patterns=[f"{sub}/*"] if sub else None, **kwargs))
    path = root / sub if sub else root
    if not path.is_dir() or not any(path.iterdir()):
        raise FileNotFoundError(f"no files under {sub!r} in {source.repo}")
    return path


def _from_hub(source: HubSource) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:  # a populated HF cache needs no network
        return _download(source, local_files_only=True)
    except (OSError, ValueError, HfHubHTTPError):
        pass
    if constants.is_offline_mode() or not hub_reachable():
        why = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the Hugging Face Hub is unreachable"
        raise ModelLoadError(f"{_describe(source)} is not in the local HF cache and {why}. {_how_to_provide(source)}")
    try:
        return _download(source, local_files_only=False)
    except RepositoryNotFoundError as err:
        raise ModelLoadError(f"the hub repo {source.repo} does not exist or is private ({err})") from err
    except RevisionNotFoundError as err:
        raise ModelLoadError(f"{source.repo} has no revision {source.revision!r} ({err})") from err
    except (EntryNotFoundError, FileNotFoundError) as err:
        raise ModelLoadError(f"{_describe(source)} does not exist in the repo: {err}") from err
    except (HfHubHTTPError, OSError) as err:
        raise ModelLoadError(f"could not download {_describe(source)}: {err}. {_how_to_provide(source)}") from err


def _how_to_provide(source: HubSource) -> str:
    include = f" --include '{source.path_in_repo}{'' if source.filename else '/*'}'" if source.path_in_repo else ""
    revision = f" --revision {source.revision}" if source.revision else ""
    return (f"Download it where there is network (`hf download {source.repo}{include}{revision} "
            "--local-dir DIR`) and give the local folder DIR instead of the hub id (same subfolder/filename), "
            "or copy a populated HF cache and point HF_HOME at it.")


def _snapshot_commit(path: Path) -> str | None:
    """The commit of a file in the HF cache (`.../snapshots/<commit>/...`)."""
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None
