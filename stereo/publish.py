"""Publishing an export on the Hugging Face Hub: `python -m stereo.publish RUN_DIR REPO`, or `export.push_to_hub=REPO`.

The repository gets what diffusers loads, with the model card:

    README.md           the model card (stereo.modelcard) with REPO in its loading snippet and the evaluation
                        table of every report of this export (found under RUN_DIR, or given with --eval)
    unet/               UNet2DConditionModel.from_pretrained(REPO, subfolder="unet"); made from the base model
                        and delta.safetensors (or lora/) when the export has no unet/ (the card says so)
    model_index.json,   the export's pipeline/ at the top, when it has one: <Pipeline>.from_pretrained(REPO)
      text_encoder/, …
    delta.safetensors, lora/, manifest.json   as in the export
    evaluation/<name>/  report.json and report.md of each evaluation in the card

The repository is first staged in a hidden folder beside the export (hard links where the file system
allows, so no weights are copied), then uploaded in one commit that also deletes what an earlier upload
left and this one does not have. The export folder itself is only read: an interrupted upload leaves it
as it was, and a rerun uploads again. The token is huggingface_hub's own (HF_TOKEN, or `hf auth login`);
it is never printed. `--dry-run FOLDER` stages into FOLDER and uploads nothing (no token needed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

from stereo.export import materialise_unet
from stereo.manifest import write_text_atomic
from stereo.modelcard import CARD_NAME, Evaluation, build_card, find_evaluations

log = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """Publishing cannot start (no token, no export); raised before anything is uploaded."""


def export_folder(path: str | Path) -> Path:
    """The export folder of a run folder (RUN_DIR/export), or `path` itself when it is an export."""
    path = Path(path)
    for folder in (path, path / "export"):
        if (folder / "manifest.json").is_file() and "formats" in json.loads((folder / "manifest.json").read_text()):
            return folder
    raise PublishError(f"{path} is neither an export folder nor a run folder with export/ (no manifest.json "
                       "with formats): pass the output_dir of a finished `python train.py` run")


def require_token() -> None:
    """Fail before any upload (or before training, for export.push_to_hub) when no Hub token is configured."""
    from huggingface_hub import get_token

    if not get_token():
        raise PublishError("no Hugging Face token: set HF_TOKEN (a write token from "
                           "https://huggingface.co/settings/tokens) or run `hf auth login`, then publish again")


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # the same bytes without a copy; the upload only reads them
    except OSError:
        shutil.copy2(source, target)


def _tree(source: Path, target: Path, skip: set[str] = frozenset()) -> None:
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = file.relative_to(source)
        if rel.parts[0] not in skip:
            _link_or_copy(file, target / rel)


def stage_repository(export_dir: str | Path, staging: str | Path, repo_id: str | None = None,
                     evaluations: list[Evaluation] = ()) -> Path:
    """Lay out the repository of `export_dir` in the new folder `staging` (see the module docstring)."""
    export_dir, staging = Path(export_dir), Path(staging)
    staging.mkdir(parents=True)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    if (export_dir / "pipeline").is_dir():
        _tree(export_dir / "pipeline", staging)  # its unet/ is the export's unet/ (both the merged UNet)
    elif (export_dir / "unet").is_dir():
        _tree(export_dir / "unet", staging / "unet")
    materialised = not (staging / "unet").is_dir()
    if materialised:
        log.info("%s has no unet/: loading the base model to apply its weights", export_dir)
        materialise_unet(export_dir, staging / "unet")
    for name in ("delta.safetensors", "manifest.json"):
        if (export_dir / name).is_file():
            _link_or_copy(export_dir / name, staging / name)
    if (export_dir / "lora").is_dir():
        _tree(export_dir / "lora", staging / "lora")
    for evaluation in evaluations:
        target = staging / "evaluation" / _evaluation_name(evaluation, staging)
        for name in ("report.json", "report.md"):
            if (evaluation.report_file.parent / name).is_file():
                _link_or_copy(evaluation.report_file.parent / name, target / name)
    card = build_card(staging, manifest, repo_id=repo_id, evaluations=list(evaluations), materialised=materialised)
    write_text_atomic(staging / CARD_NAME, str(card))
    return staging


def _evaluation_name(evaluation: Evaluation, staging: Path) -> str:
    name, n = evaluation.report_file.parent.name or "report", 1
    while (staging / "evaluation" / (name if n == 1 else f"{name}-{n}")).exists():
        n += 1
    return name if n == 1 else f"{name}-{n}"


def push_export(export_dir: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                evaluations: list[Evaluation] = (), commit_message: str | None = None, api: Any = None) -> str:
    """Upload `export_dir` as the Hub repository `repo_id` (created if missing); returns the commit's URL.

    `api`: a `huggingface_hub.HfApi` (default: a new one; tests pass a recording stand-in).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    require_token()
    export_dir = Path(export_dir)
    api = api or HfApi()
    staging = export_dir.parent / f".{export_dir.name}.publish-{uuid.uuid4().hex[:8]}"
    try:
        stage_repository(export_dir, staging, repo_id, evaluations)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=staging, revision=revision, delete_patterns="*",
            commit_message=commit_message or f"Upload {export_dir.parent.name or export_dir.name} (stereo export)")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    url = str(getattr(info, "commit_url", None) or info)
    log.info("published %s to %s", export_dir, url)
    return url


def publish_run(run_dir: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                eval_dirs: list[str | Path] = (), dry_run: str | Path | None = None, api: Any = None) -> str:
    """The CLI's work: the export of `run_dir`, its evaluations (under `run_dir`, and `eval_dirs`), then
    either staged into `dry_run` or pushed to `repo_id`. Returns the staged folder or the commit URL."""
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)  # also for a dry run: its card names the repository
    export_dir = export_folder(run_dir)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    run_root = Path(run_dir) if export_dir != Path(run_dir) else export_dir.parent
    evaluations = find_evaluations(export_dir, manifest, search=[run_root], explicit=list(eval_dirs))
    for evaluation in evaluations:
        log.info("model card: evaluation %s (models %s)", evaluation.report_file, ", ".join(evaluation.labels))
    if dry_run is not None:
        if Path(dry_run).exists() and any(Path(dry_run).iterdir()):
            raise PublishError(f"--dry-run folder {dry_run} is not empty; give a new folder")
        if Path(dry_run).exists():
            Path(dry_run).rmdir()
        return str(stage_repository(export_dir, dry_run, repo_id, evaluations))
    return push_export(export_dir, repo_id, private=private, revision=revision, evaluations=evaluations, api=api)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stereo.publish", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="output_dir of a finished `python train.py` run, or its export/ folder")
    parser.add_argument("repo", help="Hub repository id, user/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", help="upload to this branch (created if missing) instead of main")
    parser.add_argument("--eval", action="append", default=[], metavar="REPORT_DIR",
                        help="an evaluate.py output folder of this export, for the card's table (repeatable); "
                             "report.json files under RUN_DIR are found without it")
    parser.add_argument("--dry-run", metavar="FOLDER", help="write the repository into FOLDER, upload nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        where = publish_run(args.run_dir, args.repo, private=args.private, revision=args.revision,
                            eval_dirs=args.eval, dry_run=args.dry_run)
    except (PublishError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
