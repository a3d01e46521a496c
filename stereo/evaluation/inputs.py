"""What an evaluation reads: the concept, its prompts (with seeds), its detectors and the evaluated models.

An evaluated model is the base model with, at most, one of: a third-party erased UNet
(`unet_weights`), one of our export folders (`export`, read by `stereo.load_export`), a released
erased checkpoint (`hub` / `released`: a UNet, text encoder, LoRA or token file from the Hugging Face
Hub or a local copy, stereo.models.hub), or a folder of images from any generator (`images`, paired
here with the prompts); an erased text encoder (`text_encoder_weights`) and textual-inversion files
may be added. Every third-party file loaded is recorded (path, sha256, hub revision and commit) for
the report's manifest.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from stereo.attacks.base import EvalPrompt
from stereo.evaluation.detectors import Detector, detector_factory
from stereo.evaluation.prompt_sets.standard import local_paths
from stereo.evaluation.prompts import load_prompt_set
from stereo.export import apply_export
from stereo.models.components import apply_component
from stereo.models.hub import HubSource, fetch
from stereo.models.loading import ModelLoadError
from stereo.models.released import released_model

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def container(node) -> dict:
    """A plain dict of a config node (or of a mapping)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def the_concept(cfg):
    return next(iter(cfg.concepts.values()))


def eval_prompts(cfg, concept, source: str | None = None) -> tuple[list[EvalPrompt], str]:
    """The prompt set (cfg.prompts, else the concept's eval_prompts) with each prompt's seed and CFG scale."""
    source = source or cfg.prompts or concept.eval_prompts
    if not source:
        raise ValueError(f"no evaluation prompts for concept {concept.name!r}: set prompts=<built-in set or file> "
                         f"or concepts.{concept.name}.eval_prompts")
    prompt_set = load_prompt_set(source, paths=local_paths(container(cfg.get("prompt_sets") or {})))
    records = prompt_set.records[: cfg.generation.max_prompts]
    prompts = [EvalPrompt(i, r.prompt, r.seed if r.seed is not None else cfg.generation.seed + i,
                          r.guidance if r.guidance is not None else cfg.generation.guidance)
               for i, r in enumerate(records)]
    return prompts, prompt_set.source


def make_detector(settings: Mapping[str, Any], registry: Mapping | None = None) -> Detector:
    """A Detector from `{name: ..., **kwargs}` (fails fast: unknown name, missing model folder)."""
    settings = container(settings)
    if "name" not in settings:
        raise ValueError(f"detector settings {settings} name no detector; give e.g. detector={{name: nudenet}}")
    return detector_factory(settings.pop("name"), registry)(**settings)


def model_config(base_cfg, model_cfg) -> Any:
    """The base ModelConfig with the evaluated model's set fields on top (kind, pretrained, unet_weights...)."""
    merged = container(base_cfg)
    for key, value in container(model_cfg).items():
        if key in merged and value is not None:
            merged[key] = value
    return OmegaConf.create(merged)


def load_evaluated(base_cfg, model_cfg, device, sources: list | None = None):
    """The evaluated pipeline: base (or its own kind) + erased UNet / our export / released checkpoint /
    erased text encoder / textual-inversion files. Third-party files are fetched (and checked) before the
    base model loads; a provenance record of each is appended to `sources` when given."""
    from stereo.models.loading import load_pipeline

    records, components = [], []
    if model_cfg.unet_weights:
        records.append({"component": "unet", **_local_file(model_cfg.unet_weights, "unet_weights").record})
    third_party = released_source(model_cfg)
    if third_party:
        source, component, name = third_party
        fetched = fetch(source)
        components.append((component, fetched.path))
        records.append({"component": component, "released": name, **fetched.record})
    if model_cfg.text_encoder_weights:
        text_encoder = _local_file(model_cfg.text_encoder_weights, "text_encoder_weights")
        components.append(("text_encoder", text_encoder.path))
        records.append({"component": "text_encoder", **text_encoder.record})
    pipe = load_pipeline(model_config(base_cfg, model_cfg))
    if model_cfg.export:
        apply_export(pipe, Path(model_cfg.export))
    for component, path in components:
        apply_component(pipe, component, path)
    for path in model_cfg.textual_inversion:
        pipe.load_textual_inversion(str(path))
    if sources is not None:
        sources.extend(records)
    return pipe.to(device)


def released_source(model_cfg) -> tuple[HubSource, str, str | None] | None:
    """The released checkpoint an entry names, what it replaces and its registry name: the entry's own hub
    fields, and for those unset, its `released` registry entry's (None: the entry names none)."""
    if not (model_cfg.hub or model_cfg.released):
        return None
    entry = released_model(model_cfg.released) if model_cfg.released else None

    def pick(key: str, registry_key: str | None = None):
        own = getattr(model_cfg, key)
        return own if own is not None or entry is None else getattr(entry, registry_key or key)

    repo, subfolder, filename = pick("hub"), pick("subfolder"), pick("filename")
    if not repo:
        raise ModelLoadError(
            f"released model {entry.name!r} ({entry.method}) is not on the Hugging Face Hub: download {entry.url} "
            f"and give its local path, models.<label>.hub=/path/to/{entry.filename or Path(entry.url).name}")
    if entry is not None and not (subfolder or filename) and not Path(repo).expanduser().is_file():
        raise ModelLoadError(
            f"released model {entry.name!r} names the repo {repo} but no file in it (the registry could not verify "
            f"one; {entry.source}): give models.<label>.filename=<file> (and subfolder=<folder> if it is in one)")
    source = HubSource(repo, filename=filename, subfolder=subfolder, revision=pick("hub_revision", "revision"),
                       sha256=pick("sha256"))
    return source, pick("component") or "unet", entry.name if entry else None


def _local_file(path: str, key: str):
    """A local checkpoint (`unet_weights`, `text_encoder_weights`) with its provenance record."""
    if not Path(path).expanduser().exists():
        raise ModelLoadError(f"models.<label>.{key}={path} does not exist; give a local file or folder "
                             "(for a checkpoint on the Hugging Face Hub use models.<label>.hub=org/name)")
    return fetch(HubSource(str(path)))


def is_plain_base(model_cfg) -> bool:
    """True when the entry changes nothing about `base` (then the base pipeline itself is evaluated)."""
    return all(value is None or value == [] for value in container(model_cfg).values())


def folder_images(folder: str | Path, prompts: list[EvalPrompt]) -> list[tuple[EvalPrompt, Path]]:
    """Images of a folder paired with prompts: `<stem>.txt` beside an image holds its prompt; otherwise
    the sorted images are the prompt set's prompts in order (then their counts must agree)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist; models.<name>.images must be a folder "
                                f"of {', '.join(IMAGE_SUFFIXES)} files")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if all(f.with_suffix(".txt").is_file() for f in files):
        # seed and CFG scale -1: unknown, the images were not generated here
        return [(EvalPrompt(i, f.with_suffix(".txt").read_text().strip(), -1, -1.0), f)
                for i, f in enumerate(files)]
    if len(files) != len(prompts):
        raise ValueError(f"image folder {folder} holds {len(files)} images but the prompt set has {len(prompts)} "
                         "prompts; put each image's prompt in <image stem>.txt, or one image per prompt in order")
    return list(zip(prompts, files))
