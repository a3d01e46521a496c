"""Where an evaluation keeps its results: one folder per (model, attack) cell, one file per prompt.

    <output_dir>/cells/<model>/<attack>/<index>.json    per-prompt result (written as it finishes)
    <output_dir>/images/<model>/<attack>/<index>.png    its image
The cell loop (`stereo.evaluation.runner`) writes them; the report (`stereo.evaluation.report`) reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Cell:
    """One (model, attack) pair: where its per-prompt results and images live."""

    model: str
    attack: str
    root: Path

    @property
    def results_dir(self) -> Path:
        return self.root / "cells" / self.model / self.attack

    @property
    def images_dir(self) -> Path:
        return self.root / "images" / self.model / self.attack

    def result_path(self, index: int) -> Path:
        return self.results_dir / f"{index:05d}.json"

    def image_path(self, index: int) -> Path:
        return self.images_dir / f"{index:05d}.png"

    def finished(self) -> set[int]:
        return {int(p.stem) for p in self.results_dir.glob("[0-9]*.json")}

    def results(self) -> list[dict[str, Any]]:
        files = self.results_dir.glob("[0-9]*.json")
        return sorted((json.loads(p.read_text()) for p in files), key=lambda r: r["index"])
