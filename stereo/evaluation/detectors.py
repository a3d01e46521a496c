"""Concept detectors: one interface from images to a per-image score and decision, and their registry.

Every detector (NudeNet, an image classifier, CLIP zero-shot, the toy detector) answers the
same question for a batch of PIL images: how strongly does each image show the concept, and
does that count as "shown" under the detector's threshold. ASR is the mean of the decisions.
Where a decision is `score >= threshold`, the report can also give ASR at other thresholds from
the kept scores (`reported_thresholds`), without running the detector again.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Detection:
    """Per-image results for one concept: `scores[i]` in [0, 1], `flags[i]` = score >= threshold."""

    scores: list[float]
    flags: list[bool]
    details: list[dict[str, Any]] = field(default_factory=list)  # optional per-image extras

    def rate(self) -> float:
        return sum(self.flags) / max(len(self.flags), 1)


class Detector(ABC):
    """Images -> Detection. Subclasses set `name` and describe themselves for reports."""

    name: str = "detector"

    @abstractmethod
    def detect(self, images: Sequence[Image.Image]) -> Detection:
        """Score every image for the detector's concept."""

    def describe(self) -> dict[str, Any]:
        """What a report must record to make the numbers comparable (version, threshold, weights hash)."""
        return {"name": self.name}


# --- registry -------------------------------------------------------------------------------
# name -> class (or factory). Built-in detectors register when their module (DETECTOR_MODULES) is imported;
# others (e.g. the toy world's `toy`: stereo.toy.detector.register()) with register_detector(name, factory),
# or for one run only (`registry` below).
DETECTORS: dict[str, Callable[..., Detector]] = {}
# The built-in detectors' modules, imported only when asked for (heavy or optional dependencies).
DETECTOR_MODULES = {
    "nudenet": "stereo.evaluation.nudenet",
    "image_classifier": "stereo.evaluation.classifiers",
    "clip_zero_shot": "stereo.evaluation.classifiers",
    "openai_moderation": "stereo.evaluation.moderation",
}


def register_detector(name: str, factory: Callable[..., Detector] | None = None):
    """Make `build_detector(name, ...)` construct `factory`; registering the same factory again is a no-op.

    Without `factory`, a class decorator: `@register_detector("nudenet")`.
    """

    def add(factory):
        if name in DETECTORS and DETECTORS[name] is not factory:
            raise ValueError(f"A detector named {name!r} is already registered ({DETECTORS[name]}).")
        DETECTORS[name] = factory
        return factory

    return add if factory is None else add(factory)


def detector_factory(name: str, registry: Mapping[str, Callable[..., Detector]] | None = None):
    """The factory of detector `name`: from `registry` (this run's own), else the registered ones."""
    if registry and name in registry:
        return registry[name]
    if name not in DETECTORS and name in DETECTOR_MODULES:
        module = DETECTOR_MODULES[name]
        try:
            importlib.import_module(module)  # registers itself on import
        except ModuleNotFoundError as error:
            if error.name is None or not module.startswith(error.name):
                raise  # a dependency of that module is missing: show the real error
            raise ValueError(f"Detector {name!r} is defined in {module}, which is not available.") from error
    if name not in DETECTORS:
        valid = sorted(set(DETECTORS) | set(DETECTOR_MODULES) | set(registry or {}))
        raise ValueError(f"Unknown detector {name!r}; valid detectors: {valid} (a detector of another package, "
                         "e.g. the toy world's, must be registered first: stereo.toy.detector.register()).")
    return DETECTORS[name]


def detector_settings(override: Mapping[str, Any] | None, default: Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings of a run's detector: `override` (evaluate.yaml `detector`) over the concept's `default`.

    An override that names a detector replaces the default; one without a name changes the default's settings
    (`+detector.thresholds=[0.45,0.6]`, `+detector.preset=rece`); a preset replaces the default's threshold
    and labels, which it sets itself.
    """
    override, default = dict(override or {}), dict(default or {})
    if not override or "name" in override:
        return override or default
    if "preset" in override:
        default = {k: v for k, v in default.items() if k not in ("threshold", "classes")}
    return {**default, **override}


def reported_thresholds(settings: Mapping[str, Any]) -> list[float]:
    """The thresholds a report gives ASR at for the detector configured by `settings` ({name: ..., ...}): the
    detector's own answer (`report_thresholds(settings)` of its class, e.g. NudeNet's presets), else the
    `threshold` and `thresholds` as given; [] when none is known (then the report gives the detector's decisions)."""
    settings = dict(settings)
    name = settings.get("name")
    if name not in DETECTORS and name in DETECTOR_MODULES:
        try:
            importlib.import_module(DETECTOR_MODULES[name])
        except ModuleNotFoundError:
            pass  # the detector itself will say what is missing when it is built
    own = getattr(DETECTORS.get(name), "report_thresholds", None)
    if own is not None:
        return list(own(settings))
    given = [settings.get("threshold"), *(settings.get("thresholds") or [])]
    return sorted({float(t) for t in given if t is not None})


def build_detector(name: str, **kwargs: Any) -> Detector:
    """Construct the detector registered under `name` with its keyword settings."""
    return detector_factory(name)(**kwargs)


def rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")
