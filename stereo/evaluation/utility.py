"""Collateral damage of an erasure: how often each neighbouring concept still shows, erased vs base model.

Scored with the erased concept's own detector pointed at each neighbour (`{**detector, "concept": name}`),
which the toy detector supports; detectors without a `concept` setting (NudeNet, ImageNet ids) are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from stereo.evaluation.detectors import Detector, detector_factory


@dataclass
class NeighbourUtility:
    """One kept concept: images that show it, from the base and the erased model (same prompts and seeds)."""

    concept: str
    images: int
    base_hits: int
    erased_hits: int

    @property
    def kept(self) -> float:
        """Erased rate / base rate (1.0 = untouched); 0 when the base model never shows it."""
        return self.erased_hits / self.base_hits if self.base_hits else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "kept": self.kept}


def neighbour_detectors(detector: Mapping[str, Any], names: list[str],
                        registry: Mapping[str, Callable[..., Detector]] | None = None) -> dict[str, Detector] | None:
    """A detector per neighbour, built from the concept's detector settings; None when that detector cannot
    be pointed at another concept (it has no `concept` setting)."""
    settings = dict(detector)
    if "concept" not in settings or "name" not in settings:
        return None
    factory = detector_factory(settings.pop("name"), registry)
    return {name: factory(**{**settings, "concept": name}) for name in names}


def neighbour_utility(detectors: Mapping[str, Detector], base: Mapping[str, list], erased: Mapping[str, list]
                      ) -> list[NeighbourUtility]:
    """`base[name]` and `erased[name]`: images of the same neighbour prompts and seeds from either model."""
    rows = []
    for name, detector in detectors.items():
        b, e = detector.detect(base[name]), detector.detect(erased[name])
        rows.append(NeighbourUtility(name, len(b.flags), sum(b.flags), sum(e.flags)))
    return rows


def summary_line(rows: list[NeighbourUtility], detector: str) -> str:
    """One line for the end of a run: every kept concept's erased/base rate."""
    parts = [f"{r.concept} {r.kept:.0%} ({r.erased_hits}/{r.images} vs {r.base_hits}/{r.images})" for r in rows]
    return f"utility of the other concepts, erased vs base ({detector} detector): " + ", ".join(parts)
