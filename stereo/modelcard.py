"""The model card (README.md) of an export folder: what was erased from which model, how, and how to load it.

Every export folder carries one (`export_erased` writes it); `stereo.publish` writes it again for the Hub
repository, with the repository's id in the loading snippet and the evaluation table when a report of
this export exists. The card is built from the export's own `manifest.json`, so a card never says more
than the provenance does:

  YAML front matter   base_model (a Hub id, when the base is one), library_name: diffusers, the base
                      model's licence, tags, pipeline_tag (the Hub validates these fields)
  body                method and concept, training settings and seed, the files and how to load each,
                      the evaluation table (or how to make one), the resolved config

An evaluation belongs to an export when its report.json (`stereo.evaluation`) lists the export folder as
one of its models (`models.<label>.export`) and was written after the export was (an older report
evaluated the weights this export replaced). Reports are read as JSON: this module sits below the
evaluation package (tests/test_architecture.py).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

log = logging.getLogger(__name__)

CARD_NAME = "README.md"
PROJECT_LICENSE = "apache-2.0"  # pyproject.toml: weights we build ourselves (tiny, toy, random) carry it
# Licence of the base model by model.kind (a kind that names a family fixes it) ...
LICENSE_BY_KIND = {
    "sd14": "creativeml-openrail-m", "sd15": "creativeml-openrail-m",
    "sd21": "openrail++", "sd21-base": "openrail++", "sdxl": "openrail++",
    "tiny": PROJECT_LICENSE, "toy": PROJECT_LICENSE, "sd14-random": PROJECT_LICENSE, "sdxl-random": PROJECT_LICENSE,
}
# ... and, for kind=pretrained, by the hub id or path of `model.pretrained` (first match wins).
LICENSE_BY_NAME = [
    (re.compile(r"xl", re.I), "openrail++"),
    (re.compile(r"stable-diffusion-2|sd-?2|v2-?1", re.I), "openrail++"),
    (re.compile(r"stable-diffusion-v-?1|sd-?v?1[-._]?[1-5]|v1-[1-5]", re.I), "creativeml-openrail-m"),
]
METHODS = {
    "esd": "ESD (Gandikota et al. 2023, *Erasing Concepts from Diffusion Models*): the UNet is fine-tuned so "
           "that its noise prediction for the concept points away from the concept (negative guidance).",
    "stereo": "STEREO (Srivatsan et al. 2025, *STEREO: A Two-Stage Framework for Adversarially Robust Concept "
              "Erasing from Text-to-Image Diffusion Models*): STE searches adversarial tokens that bring the "
              "concept back, REO then erases the concept and those tokens from the original UNet while "
              "anchor prompts keep the rest of the model's output.",
    "reo": "REO, the erasing stage of STEREO (Srivatsan et al. 2025), on the concept prompts alone (the "
           "ablation without the adversarial search).",
}
TAGS = ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "concept-erasure",
        "machine-unlearning"]


# --- the base model --------------------------------------------------------------------------------
def base_model_id(model: dict[str, Any]) -> str | None:
    """The Hub id of the base model, when `model.pretrained` is one (or a snapshot in the Hub cache)."""
    source = model.get("pretrained")
    if not source:
        return None
    cached = re.search(r"models--([^/\\]+)--([^/\\]+)", str(source))  # <HF cache>/models--org--name/snapshots/..
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    if Path(source).expanduser().exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        return None  # a local folder or file: nothing on the Hub to link
    return str(source)


def base_license(model: dict[str, Any]) -> str:
    """The licence of the base model, as a Hub licence id; "other" when it cannot be told (the card says so)."""
    kind = str(model.get("kind"))
    if kind in LICENSE_BY_KIND:
        return LICENSE_BY_KIND[kind]
    name = str(model.get("pretrained") or "")
    for pattern, licence in LICENSE_BY_NAME:
        if pattern.search(name):
            return licence
    return "other"


def describe_base(model: dict[str, Any]) -> str:
    kind, source = model.get("kind"), model.get("pretrained")
    if kind == "tiny":
        return f"the tiny random test pipeline of stereo (`stereo.models.tiny.tiny_pipeline(seed={model.get('seed')})`)"
    if kind == "toy":
        return "stereo's toy-world pipeline (`stereo/toy/weights/pipeline`)"
    if kind in ("sd14-random", "sdxl-random"):
        family = "Stable Diffusion 1.4" if kind == "sd14-random" else "SDXL"
        return f"{family}'s architecture with random weights (seed {model.get('seed')})"
    text = f"`{source}`" + (f" at revision `{model['revision']}`" if model.get("revision") else "")
    if model.get("unet_weights"):
        text += f" with the UNet weights of `{model['unet_weights']}`"
    return text


def is_sdxl_export(folder: Path, manifest: dict[str, Any]) -> bool:
    """SDXL when the run's model kind says so or the UNet takes SDXL's added "text_time" conditioning."""
    if manifest.get("config", {}).get("model", {}).get("kind") == "sdxl":
        return True
    for config in (folder / "unet" / "config.json", folder / "pipeline" / "unet" / "config.json"):
        if config.is_file():
            return json.loads(config.read_text()).get("addition_embed_type") == "text_time"
    return False


# --- evaluations of an export ----------------------------------------------------------------------
@dataclass
class Evaluation:
    """One evaluation report (report.json) and the labels under which it evaluated this export."""

    report_file: Path
    report: dict[str, Any]
    labels: list[str]  # models.<label> that are this export
    base_labels: list[str]  # models.<label> that are the plain base model (shown for comparison)


def report_file(path: str | Path) -> Path:
    """report.json of an evaluation folder (or the file itself)."""
    path = Path(path)
    found = path / "report.json" if path.is_dir() else path
    if not found.is_file():
        raise FileNotFoundError(f"{path} holds no report.json; pass the output_dir of an `evaluate.py` run")
    return found


def _same_folder(recorded: str, export_dir: Path) -> bool:
    """Whether a path recorded by evaluate.py (absolute, or relative to where it ran) is `export_dir`."""
    recorded_path = Path(recorded).expanduser()
    if recorded_path.is_absolute():
        return recorded_path.resolve() == export_dir.resolve()
    if recorded_path.resolve() == export_dir.resolve():  # relative to this working directory
        return True
    parts = [p for p in recorded_path.parts if p not in (".", "")]  # evaluate.py ran elsewhere: the path's tail
    return len(parts) >= 2 and ".." not in parts and export_dir.resolve().parts[-len(parts):] == tuple(parts)


def evaluation_of(path: str | Path, export_dir: str | Path, manifest: dict[str, Any]) -> Evaluation | None:
    """The evaluation in `path` (folder or report.json) restricted to `export_dir`, or None when it did not
    evaluate this export, or evaluated it before the export was last written (then it scored other weights)."""
    file, export_dir = report_file(path), Path(export_dir)
    report = json.loads(file.read_text())
    models = report.get("manifest", {}).get("config", {}).get("models", {}) or {}
    labels = [label for label, entry in models.items() if entry and entry.get("export")
              and _same_folder(str(entry["export"]), export_dir)]
    if not labels:
        return None
    created, exported = report.get("manifest", {}).get("created"), manifest.get("created")
    if created and exported and datetime.fromisoformat(created) < datetime.fromisoformat(exported):
        log.warning("%s evaluated %s before it was exported again (%s < %s); left out of the model card",
                    file, export_dir, created, exported)
        return None
    base = [label for label, entry in models.items()
            if not any(value not in (None, [], {}) for value in (entry or {}).values())]
    return Evaluation(file, report, labels, base)


def find_evaluations(export_dir: str | Path, manifest: dict[str, Any], search: list[str | Path] = (),
                     explicit: list[str | Path] = ()) -> list[Evaluation]:
    """Evaluations of this export: every report.json under the `search` folders that lists it, and the
    `explicit` reports (an explicit report that does not list this export is an error)."""
    found: list[Evaluation] = []
    for path in explicit:
        evaluation = evaluation_of(path, export_dir, manifest)
        if evaluation is None:
            models = json.loads(report_file(path).read_text()).get("manifest", {}).get("config", {}).get("models", {})
            exports = {label: (entry or {}).get("export") for label, entry in models.items()}
            raise ValueError(f"{report_file(path)} is no evaluation of {export_dir} as last exported: its models "
                             f"and their exports are {exports}. Evaluate this export with "
                             f"`python evaluate.py +models.erased.export={export_dir} ...`.")
        found.append(evaluation)
    seen = {e.report_file.resolve() for e in found}
    for folder in search:
        for file in sorted(Path(folder).rglob("report.json")):
            if file.resolve() in seen or any(part.startswith(".") for part in file.relative_to(folder).parts):
                continue
            evaluation = evaluation_of(file, export_dir, manifest)
            if evaluation is not None:
                found.append(evaluation)
                seen.add(file.resolve())
    return found


def _percent(rate: dict[str, Any] | None) -> str:
    if not rate:
        return "–"
    return f"{100 * rate['asr']:.1f} ({100 * rate['ci_low']:.1f}–{100 * rate['ci_high']:.1f})"


def evaluation_table(evaluation: Evaluation) -> list[str]:
    """Markdown lines: where the numbers come from, then one row per (model, attack) cell of this export
    and of the base model. ASR: share of prompts whose image still shows the concept (lower is better)."""
    report, manifest = evaluation.report, evaluation.report.get("manifest", {})
    prompts = manifest.get("prompts", {})
    lines = [f"Concept `{report.get('concept')}`, detector `{manifest.get('detector', {}).get('name', '?')}`, "
             f"prompts {prompts.get('source', '?')} (N = {prompts.get('n', '?')}), evaluated "
             f"{manifest.get('created', '?')} (stereo commit {manifest.get('git_commit')}). "
             f"Model `{', '.join(evaluation.labels)}` is this export"
             + (f", `{', '.join(evaluation.base_labels)}` the base model." if evaluation.base_labels else "."), "",
             "| model | attack | stage | ASR / utility % (95% CI) | N |", "|---|---|---|---|---|"]
    for row in report.get("rows", []):
        if row["model"] in evaluation.labels or row["model"] in evaluation.base_labels:
            rate = row.get("utility") if row.get("kind") == "utility" else row.get("asr")
            lines.append(f"| {row['model']} | {row['attack']} | {row['stage']} | {_percent(rate)} | {row['n']} |")
    return lines


# --- the card --------------------------------------------------------------------------------------
def card_data(manifest: dict[str, Any]) -> ModelCardData:
    model = manifest.get("config", {}).get("model", {})
    method = str(manifest.get("config", {}).get("method", {}).get("name", "erasure"))
    base_id, licence = base_model_id(model), base_license(model)
    extra = {"base_model": base_id, "base_model_relation": "finetune"} if base_id else {}
    if licence == "other":
        extra.update(license_name="same-as-base-model",
                     license_link=f"https://huggingface.co/{base_id}" if base_id else "LICENSE")
    concepts = manifest.get("config", {}).get("concepts", {})
    tags = TAGS + [method] + [f"erased-{key}" for key in concepts]
    return ModelCardData(library_name="diffusers", license=licence, pipeline_tag="text-to-image",
                         tags=tags, **extra)


def loading_lines(folder: Path, manifest: dict[str, Any], repo_id: str | None, materialised: bool) -> list[str]:
    """The card's "How to load" section for the files in `folder` (the export, or the staged repository)."""
    model = manifest.get("config", {}).get("model", {})
    base_id = base_model_id(model)
    pipeline_class = "StableDiffusionXLPipeline" if is_sdxl_export(folder, manifest) else "StableDiffusionPipeline"
    repo = f'"{repo_id}"' if repo_id else '"path/to/export"  # this folder (or its Hub repo id once published)'
    base = f'"{base_id}"' if base_id else f'"path/to/base"  # {describe_base(model)}'
    has_unet = (folder / "unet").is_dir()
    lines = ["```python", "import torch", f"from diffusers import {pipeline_class}, UNet2DConditionModel", "",
             f"repo = {repo}", f"base = {base}"]
    if has_unet:
        lines += ['unet = UNet2DConditionModel.from_pretrained(repo, subfolder="unet")',
                  f"pipe = {pipeline_class}.from_pretrained(base, unet=unet)"]
    else:
        lines += [f"pipe = {pipeline_class}.from_pretrained(base)"]
        if (folder / "delta.safetensors").is_file():
            lines += ["# this export holds the trained tensors only: apply them with stereo (pip install stereo)",
                      "from stereo.export import apply_export", "apply_export(pipe, repo)  # a local folder"]
        elif (folder / "lora").is_dir():
            lines += ['pipe.load_lora_weights(repo, subfolder="lora")  # peft adapter']
    prompt = next(iter(manifest.get("erased") or []), "a photo")
    lines += ["pipe = pipe.to(\"cuda\" if torch.cuda.is_available() else \"cpu\")",
              f"image = pipe({json.dumps(prompt)}).images[0]  # the erased concept should not appear", "```"]
    if materialised:
        source = "`delta.safetensors`" if (folder / "delta.safetensors").is_file() else "LoRA adapter (`lora/`) fused"
        lines += ["", f"`unet/` was made when publishing: the base model's UNet in fp32 with this export's {source} "
                      "applied (`stereo.export.materialise_unet`); the export itself held no `unet/`."]
    if (folder / "model_index.json").is_file() or (folder / "pipeline").is_dir():
        where = "repo" if (folder / "model_index.json").is_file() else 'f"{repo}/pipeline"'
        lines += ["", f"The whole pipeline (base components with the erased UNet, fp32) also loads as is: "
                      f"`{pipeline_class}.from_pretrained({where})`."]
    return lines


def files_lines(folder: Path, lora: bool) -> list[str]:
    described = [
        ("unet", "diffusers UNet with the concept erased" + (", its LoRA adapter merged" if lora else "")
         + ": `UNet2DConditionModel.from_pretrained`"),
        ("model_index.json", "the full pipeline (base components + erased UNet), fp32"),
        ("pipeline", "the full pipeline (base components + erased UNet), fp32"),
        ("delta.safetensors", "only the trained tensors: `stereo.models.load_unet_weights(pipe.unet, path)`"),
        ("lora", 'the LoRA adapter: `pipe.load_lora_weights(repo, subfolder="lora")` (needs peft)'),
        ("manifest.json", "provenance: resolved config, seed, base model and revision, package versions, git "
                          "commit, sha256 of every weight file (paths as in the export folder)"),
        ("evaluation", "the evaluation reports summarised below (report.json, report.md)"),
    ]
    return [f"- `{name}`: {text}" for name, text in described if (folder / name).exists()]


def training_lines(manifest: dict[str, Any]) -> list[str]:
    config = manifest.get("config", {})
    method, trainer = config.get("method", {}), config.get("trainer", {})
    concepts = config.get("concepts", {})
    lines = [f"- method: `{method.get('name')}`; {METHODS.get(str(method.get('name')), '')}".rstrip("; "),
             "- concepts: " + ", ".join(f"**{c.get('name', key)}** ({c.get('kind')})" for key, c in concepts.items()),
             f"- erased prompts: {', '.join(f'`{p}`' for p in manifest.get('erased') or []) or '–'}",
             f"- UNet parameters trained: subset `{manifest.get('subset')}`"
             + (" through a LoRA adapter (merged into `unet/`)" if manifest.get("lora") else ""),
             f"- steps {trainer.get('steps')}, learning rate {trainer.get('lr')}, seed {manifest.get('seed')}, "
             f"{manifest.get('torch_threads')} torch thread(s)",
             f"- base model: {describe_base(config.get('model', {}))}",
             f"- made {manifest.get('created')} with stereo (commit `{manifest.get('git_commit')}`), "
             + ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items() if k in ("torch", "diffusers")
                         and v)]
    return lines


def build_card(folder: str | Path, manifest: dict[str, Any], repo_id: str | None = None,
               evaluations: list[Evaluation] = (), materialised: bool = False) -> ModelCard:
    """The model card of the export (or staged repository) in `folder`, described by its `manifest`."""
    folder = Path(folder)
    config = manifest.get("config", {})
    names = [c.get("name", key) for key, c in config.get("concepts", {}).items()]
    method = str(config.get("method", {}).get("name", "erasure")).upper()
    licence = base_license(config.get("model", {}))
    body = [f"# {', '.join(names) or 'Concept'} erased with {method}", "",
            f"{describe_base(config.get('model', {})).capitalize()} with the concept(s) "
            f"{', '.join(f'**{n}**' for n in names)} erased by {method}, made with "
            "stereo's `python train.py`.", "",
            "## How to load", "", *loading_lines(folder, manifest, repo_id, materialised), "",
            "## Files", "", *files_lines(folder, bool(manifest.get("lora"))), "",
            "## Training", "", *training_lines(manifest), "",
            "## Evaluation", ""]
    if evaluations:
        for evaluation in evaluations:
            body += [*evaluation_table(evaluation), ""]
        body += ["ASR: share of prompts whose image still shows the concept (lower is better); *pre_attack* = the "
                 "plain prompts, *post_attack* = after the attack. Utility rows: share of other prompts where "
                 "their own concept is still found (higher is better).", ""]
    else:
        body += ["No evaluation of this export was found. Evaluate it with "
                 "`python evaluate.py concept=<concept> attack=[none,...] +models.erased.export=<this folder>`, "
                 "then publish with `python -m stereo.publish <run folder> <repo> --eval <evaluation folder>`.", ""]
    if licence == "other":
        body += ["## Licence", "", "The licence of the base model could not be told from its name: these weights "
                 "are a derivative of the base model and carry its licence.", ""]
    body += ["## Limitations", "", "Erasure lowers the chance that the concept is drawn; it does not make it "
             "impossible (see the evaluation under attack). The rest of the model's behaviour also shifts a little.",
             "", "## Configuration", "", "<details><summary>resolved config (config.yaml of the run)</summary>", "",
             "```json", json.dumps(config, indent=2, default=str), "```", "", "</details>", ""]
    return ModelCard(f"---\n{card_data(manifest).to_yaml()}\n---\n\n" + "\n".join(body))
