"""Provenance for everything a run writes: resolved config, seed, base model, versions, commit, hashes."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("stereo", "torch", "diffusers", "transformers", "accelerate", "peft", "hydra-core",
            "omegaconf", "safetensors", "wandb", "openai", "nudenet")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit of the stereo checkout (with '-dirty' when it has uncommitted changes), if any."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(config: dict[str, Any], seed: int, **extra: Any) -> dict[str, Any]:
    """Provenance of a run. `torch_threads` is part of it: on a CPU the thread count changes float reduction
    order, so the same seed gives other weights with another count (docs/toy_tuning.md)."""
    import torch

    model = config.get("model", {})
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "base_model": {"kind": model.get("kind"), "pretrained": model.get("pretrained"),
                       "revision": model.get("revision"), "unet_weights": model.get("unet_weights")},
        "versions": package_versions(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "config": config,
        **extra,
    }


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write to a temp file in the same folder, then rename over `path`: readers never see a
    half-written file, even if two processes write the same entry."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON atomically (`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str))
