"""Where an evaluation keeps its results: one folder per (model, attack) cell, one file per prompt.

    <output_dir>/cells/<model>/<attack>/<index>.json    per-prompt result (written as it finishes)
    <output_dir>/cells/<model>/<attack>/settings.json   what the cell was asked (checked on resume)
    <output_dir>/images/<model>/<attack>/<index>.png    its image
An attack with `restarts: R` has one cell per restart: restart 0 is `<attack>` (the cell a run without
restarts writes, so raising R reuses it), restart r >= 1 is `<attack>@r<r>` (`restart_cell`); each
resumes on its own. Utility sets are cells `utility` (metrics.utility_prompts) and `utility-<name>`.
The cell loop (`stereo.evaluation.cells`) writes them; the metrics (`stereo.evaluation.metrics`) read them.
A resumed evaluation skips the finished prompts of a cell after `check_resumable` has made sure
they answer the same question.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from stereo.attacks.base import AttackedPrompt, EvalPrompt
from stereo.manifest import write_json_atomic

RESTART_MARK = "@r"


def restart_cell(attack: str, restart: int) -> str:
    """The cell name of restart `restart` of the attack keyed `attack` (restart 0: `attack` itself)."""
    return attack if restart == 0 else f"{attack}{RESTART_MARK}{restart}"


def split_restart(cell_attack: str) -> tuple[str, int]:
    """(attack key, restart) of a cell name made by `restart_cell`."""
    key, mark, number = cell_attack.rpartition(RESTART_MARK)
    if mark and number.isdigit():
        return key, int(number)
    return cell_attack, 0


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

    def save_result(self, item: AttackedPrompt, image: Image.Image, score: float, flag: bool, seconds: float) -> None:
        """One prompt's image, then its result file (written last: it marks the prompt finished)."""
        self.images_dir.mkdir(parents=True, exist_ok=True)
        image.save(self.image_path(item.index))
        write_json_atomic(self.result_path(item.index), {
            "index": item.index, "prompt": item.prompt, "text": item.text, "seed": item.seed,
            "guidance": item.guidance, "score": score, "flag": flag, "seconds": seconds,
            "image": str(self.image_path(item.index).relative_to(self.root)), "info": item.info})


def check_resumable(cell: Cell, prompts: list[EvalPrompt], settings: dict[str, Any]) -> set[int]:
    """Indices already finished in `cell`, after checking they belong to this evaluation.

    A resumed run must ask the same question: the same prompt and seed at every finished index, the
    same attack budget, generation settings and detector (`settings`). Anything else would mix two
    evaluations in one number, so it is an error.
    """
    settings_file = cell.results_dir / "settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) != json.loads(json.dumps(settings)):
        raise ValueError(f"{cell.results_dir} was evaluated with other settings ({settings_file.read_text()}), "
                         f"not {settings}; use a new output_dir, or delete that folder to redo the cell")
    by_index = {p.index: p for p in prompts}
    finished = set()
    for result in cell.results():
        current = by_index.get(result["index"])
        if current is None:
            continue  # beyond max_prompts this time: kept on disk, left out of the report
        if (current.prompt, current.seed, current.guidance) != (result["prompt"], result["seed"], result["guidance"]):
            raise ValueError(f"{cell.result_path(result['index'])} holds prompt {result['prompt']!r} (seed "
                             f"{result['seed']}) but this evaluation's prompt {current.index} is {current.prompt!r} "
                             f"(seed {current.seed}); use a new output_dir for a different prompt set")
        finished.add(result["index"])
    write_json_atomic(settings_file, settings)
    return finished
