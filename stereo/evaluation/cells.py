"""The cell loop: for one (model, attack) cell, attack the prompts, generate, detect, save each result.

    attack.prepare(target)                 per-concept work (learn a token), shared by the processes
    attacked = attack.attack(target, ...)  one attacked prompt per unfinished prompt of this process
    for each batch: images -> detector.detect(images) -> Cell.save_result per prompt

An image-folder model runs the same loop with its images read from disk instead of generated.
Sharding: under `accelerate launch` each process takes prompts[rank::world]; results meet on
disk and the attacked prompts are gathered to the main process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from PIL import Image
from tqdm.auto import tqdm

from stereo.attacks.base import (
    AttackedPrompt,
    AttackTarget,
    EvalPrompt,
    GenerationSettings,
    build_attack,
    read_attacked,
    render,
    write_attacked,
)
from stereo.evaluation.config import cell_budget, validate_eval
from stereo.evaluation.detectors import Detector
from stereo.evaluation.detectors import detector_settings as merged_detector_settings
from stereo.evaluation.inputs import container, eval_prompts, folder_images, make_detector, the_concept
from stereo.evaluation.layout import Cell, check_resumable
from stereo.generation import open_rgb
from stereo.parallel import main_process_value, make_accelerator

log = logging.getLogger(__name__)
UTILITY = "utility"  # the cell of metrics.utility_prompts; metrics.utility_sets' cells are `utility-<name>`


class Evaluation:
    """State shared by all cells of one run: config, accelerator, concept, prompts, detectors, base pipeline.

    `detectors`: extra detector factories by name for this run only (on top of the global registry).
    """

    def __init__(self, cfg, detectors: Mapping[str, Callable] | None = None):
        validate_eval(cfg)
        self.cfg = cfg
        self.accelerator = make_accelerator(cfg.cpu, cfg.dist_timeout_minutes)
        cfg.output_dir = main_process_value(str(cfg.output_dir))  # one folder for every process
        self.out = Path(cfg.output_dir)
        self.concept = the_concept(cfg)
        self.prompts, self.prompt_source = eval_prompts(cfg, self.concept)
        # evaluate.yaml's `detector` over the concept's: a named one replaces it, `+detector.preset=rece` or
        # `+detector.thresholds=[...]` change it
        settings = merged_detector_settings(container(cfg.detector) if cfg.detector else None,
                                            container(self.concept.detector))
        self.detector = make_detector(settings, detectors)
        self.black_box_prompts: dict[str, dict[int, AttackedPrompt]] = {}  # attack -> prompt index -> result
        self.detector_settings = {id(self.detector): settings}  # recorded with each cell, checked on resume
        # utility cell -> (its prompts, its detector): `utility` (metrics.utility_prompts) and `utility-<name>`
        # (metrics.utility_sets), each measuring how often a non-target concept is still drawn
        self.utility_sets: dict[str, tuple[list[EvalPrompt], Detector]] = {}
        if cfg.metrics.utility_prompts:
            self.add_utility_set(UTILITY, cfg.metrics.utility_prompts, cfg.metrics.utility_detector, detectors)
        for name, entry in (cfg.metrics.utility_sets or {}).items():
            entry = container(entry)
            unknown = set(entry) - {"prompts", "detector"}
            if unknown or not entry.get("prompts"):
                raise ValueError(f"metrics.utility_sets.{name} = {entry}: give {{prompts: <set or file>, detector: "
                                 f"{{name: ..., ...}}}} (detector optional: the concept's)")
            self.add_utility_set(f"{UTILITY}-{name}", entry["prompts"], entry.get("detector"), detectors)
        self.generation = GenerationSettings(cfg.generation.steps, cfg.generation.batch_size)
        self._base_pipe = None

    def add_utility_set(self, cell: str, source: str, detector_settings, detectors: Mapping | None) -> None:
        prompts, _ = eval_prompts(self.cfg, self.concept, source)
        settings = container(detector_settings) if detector_settings else self.detector_settings[id(self.detector)]
        detector = make_detector(settings, detectors)
        self.detector_settings[id(detector)] = settings
        self.utility_sets[cell] = (prompts, detector)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def distributed(self) -> bool:
        return self.accelerator.num_processes > 1

    @property
    def progress(self) -> bool:
        return bool(self.cfg.progress) and self.main

    def base_pipe(self):
        if self._base_pipe is None:
            from stereo.models.loading import load_pipeline

            self._base_pipe = load_pipeline(self.cfg.base).to(self.accelerator.device)
        return self._base_pipe

    def release(self, pipe) -> None:
        """Free an evaluated pipeline's accelerator memory before the next model loads (not the base)."""
        if pipe is not self._base_pipe:
            pipe.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def shard(self, items: list) -> list:
        return items[self.accelerator.process_index:: self.accelerator.num_processes]

    # --- the two kinds of cell ------------------------------------------------------------------
    def run_cell(self, cell: Cell, pipe, attack_settings, prompts: list[EvalPrompt], detector,
                 restart: int = 0) -> None:
        """Attack + generate + detect the unfinished prompts of this process's shard, saving each batch;
        `restart`: which independent restart of the attack the cell holds (`AttackTarget.restart`)."""
        # the detector as it decides; extra reported thresholds are computed from saved scores, not part of a cell
        decides = {k: v for k, v in self.detector_settings[id(detector)].items() if k != "thresholds"}
        settings = {"attack": cell_budget(attack_settings, restart), "detector": decides,
                    "generation": {"steps": self.cfg.generation.steps}}  # seeds and CFG are checked per prompt
        finished = check_resumable(cell, prompts, settings)
        pending = self.shard([p for p in prompts if p.index not in finished])
        everyone_pending = any(gather_object([bool(pending)])) if self.distributed else bool(pending)
        if not everyone_pending:
            log.info("%s / %s: all %d prompts already evaluated, skipped", cell.model, cell.attack, len(prompts))
            return
        attack = build_attack(attack_settings)
        target = AttackTarget(pipe, self.base_pipe(), self.concept, self.out / "attacks" / cell.model / cell.attack,
                              self.out / "galleries" / self.concept.name, detector, self.generation, self.progress,
                              self.accelerator, restart)
        start = time.perf_counter()
        attack.prepare(target)  # on every process: galleries are sharded, inversions data-parallel
        attacked = self.attack_prompts(attack, target, cell.attack, pending, settings["attack"])
        attack_seconds = (time.perf_counter() - start) / max(len(pending), 1)
        self.save_attacked(target.out_dir, attacked)
        self.detect_and_save(cell, attacked, lambda batch: render(pipe, batch, self.generation), detector,
                             attack_seconds)
        self.accelerator.wait_for_everyone()

    def run_image_folder(self, cell: Cell, folder: str, prompts: list[EvalPrompt], detector) -> None:
        """Detect + save the unfinished images of a folder (no attack: the images are scored as they are)."""
        finished = cell.finished()
        pairs = self.shard([(p, f) for p, f in folder_images(folder, prompts) if p.index not in finished])
        files = {p.index: f for p, f in pairs}
        items = [AttackedPrompt.of(p, p.prompt) for p, _ in pairs]
        self.detect_and_save(cell, items, lambda batch: [open_rgb(files[item.index]) for item in batch], detector)
        self.accelerator.wait_for_everyone()

    # --- the loop ---------------------------------------------------------------------------------
    def detect_and_save(self, cell: Cell, items: list[AttackedPrompt],
                        images_of: Callable[[list[AttackedPrompt]], list[Image.Image]], detector,
                        extra_seconds: float = 0.0) -> None:
        """Batch by batch: the items' images (generated or read), the detector's decisions, one saved result
        per item. `seconds` of a result = its share of the batch's time + `extra_seconds` (its attack)."""
        size = self.cfg.generation.batch_size
        bar = tqdm(range(0, len(items), size), desc=f"{cell.model}/{cell.attack}", disable=not self.progress)
        for start in bar:
            batch = items[start:start + size]
            began = time.perf_counter()
            images = images_of(batch)
            detection = detector.detect(images)
            seconds = (time.perf_counter() - began) / len(batch)
            for item, image, score, flag in zip(batch, images, detection.scores, detection.flags):
                cell.save_result(item, image, float(score), bool(flag), seconds + extra_seconds)

    # --- attacked prompts -------------------------------------------------------------------------
    def attack_prompts(self, attack, target: AttackTarget, name: str, prompts: list[EvalPrompt],
                       budget: dict | None = None) -> list[AttackedPrompt]:
        """`attack.attack(target, prompts)`, with black-box results shared by every model: a black-box
        attack reads only the base model's public text encoder, so its prompts do not depend on the
        evaluated model, and one search serves them all (Ring-A-Bell's search is the costly part). The
        results are also kept on disk (`black_box_file`), so a later run with the same base model, attack
        budget and prompts (another model, another process on the same output_dir) reuses them."""
        if attack.white_box:
            return attack.attack(target, prompts) if prompts else []
        path = self.black_box_file(name, budget or {})
        found = self.black_box_prompts.get(name)
        if found is None:
            found = self.black_box_prompts[name] = read_black_box(path)
        todo = [p for p in prompts if not same_prompt(found.get(p.index), p)]
        new = attack.attack(target, todo) if todo else []
        found.update((item.index, item) for item in new)
        self.keep_black_box(path, new)
        return [found[p.index] for p in prompts]

    def black_box_file(self, name: str, budget: dict) -> Path:
        """Where a black-box attack's prompts live: named by the base model and the attack's budget."""
        key = json.dumps({"base": container(self.cfg.base), "attack": budget}, sort_keys=True, default=str)
        return self.out / "black_box" / name / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"

    def keep_black_box(self, path: Path, new: list[AttackedPrompt]) -> None:
        """Every process's new results, merged with those on disk by the main process (atomic write)."""
        items = gather_object([a.to_dict() for a in new]) if self.distributed else [a.to_dict() for a in new]
        if self.main and items:
            merged = {**read_black_box(path), **{item["index"]: AttackedPrompt(**item) for item in items}}
            write_attacked(path, list(merged.values()))

    def save_attacked(self, out_dir: Path, attacked: list[AttackedPrompt]) -> None:
        """Every process's attacked prompts, merged with those on disk, as prompts.jsonl + prompts.txt."""
        items = gather_object([a.to_dict() for a in attacked]) if self.distributed else \
            [a.to_dict() for a in attacked]
        if self.main and items:
            path = out_dir / "prompts.jsonl"
            previous = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
            merged: dict[int, Any] = {item["index"]: item for item in [*previous, *items]}
            write_attacked(path, [AttackedPrompt(**item) for item in merged.values()])
            (out_dir / "prompts.txt").write_text("".join(f"{i['text']}\n" for i in sorted(
                merged.values(), key=lambda item: item["index"])), encoding="utf-8")


def read_black_box(path: Path) -> dict[int, AttackedPrompt]:
    """Prompt index -> attacked prompt of a black-box cache file ({} if there is none yet)."""
    if not path.is_file():
        return {}
    return {item.index: item for item in read_attacked(path)}


def same_prompt(item: AttackedPrompt | None, prompt: EvalPrompt) -> bool:
    """Whether a cached attacked prompt was made from this prompt (the set may have changed under its index)."""
    return item is not None and (item.prompt, item.seed, item.guidance) == (prompt.prompt, prompt.seed,
                                                                           prompt.guidance)
