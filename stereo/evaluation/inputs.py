"""What an evaluation reads: the concept, its prompts (with seeds), its detectors and the evaluated models.

An evaluated model is the base model with, at most, one of: a third-party erased UNet
(`unet_weights`), one of our export folders (`export`, read by `stereo.load_export`), or a folder
of images from any generator (`images`, paired here with the prompts); textual-inversion files
may be added to any of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from stereo.attacks.base import EvalPrompt
from stereo.evaluation.detectors import Detector, detector_factory
from stereo.evaluation.prompts import load_prompt_set
from stereo.export import apply_export

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
    prompt_set = load_prompt_set(source)
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


def load_evaluated(base_cfg, model_cfg, device):
    """The evaluated pipeline: base (or its own kind) + erased UNet / our export / textual-inversion files."""
    from stereo.models.loading import load_pipeline

    pipe = load_pipeline(model_config(base_cfg, model_cfg))
    if model_cfg.export:
        apply_export(pipe, Path(model_cfg.export))
    for path in model_cfg.textual_inversion:
        pipe.load_textual_inversion(str(path))
    return pipe.to(device)


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
