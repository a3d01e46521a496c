"""Concept detectors: one interface from images to a per-image score and decision, and their registry.

Every detector (NudeNet, an image classifier, CLIP zero-shot, the toy detector) answers the
same question for a batch of PIL images: how strongly does each image show the concept, and
does that count as "shown" under the detector's threshold. ASR is the mean of the decisions.
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


def build_detector(name: str, **kwargs: Any) -> Detector:
    """Construct the detector registered under `name` with its keyword settings."""
    return detector_factory(name)(**kwargs)


def rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")
