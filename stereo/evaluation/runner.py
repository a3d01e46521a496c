"""`evaluate(cfg)`: every evaluated model × every attack on one concept, written as a report.

For each (model, attack) cell (an attack with `restarts: R` has R cells, one per independent
restart) and each prompt of the evaluation set: attack the prompt, generate
its image with the prompt's fixed seed, ask the detector whether the concept shows, save the result
(`stereo.evaluation.cells`; files in `stereo.evaluation.layout`, so a resumed evaluation skips
finished prompts). Then, per cell, ASR / CLIP score / FID / time (`stereo.evaluation.metrics`),
written as report.json / report.md / grids / trade-off plot (`stereo.evaluation.report`).

Sharding: under `accelerate launch` each process takes a share of the prompts (and of the
galleries, token inversions and FID reference features); what stays on the main process (the
report) is covered by `dist_timeout_minutes`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from omegaconf import OmegaConf

from stereo.attacks.base import build_attack
from stereo.evaluation.cells import UTILITY, Evaluation
from stereo.evaluation.config import NoAttackConfig, attack_restarts, evaluated_models
from stereo.evaluation.inputs import is_plain_base, load_evaluated
from stereo.evaluation.layout import Cell, restart_cell
from stereo.evaluation.metrics import MetricSet, Report, cell_row
from stereo.evaluation.report import write_report
from stereo.manifest import build_manifest
from stereo.parallel import release

IMAGES = "images"  # the cell of an image-folder model


def evaluate(cfg, detectors: Mapping[str, Callable] | None = None,
             feature_extractors: Mapping[str, Callable] | None = None) -> Report | None:
    """Run the evaluation described by `cfg` (conf/evaluate.yaml) and write its report; returns it on the
    main process (None on the others). `detectors` / `feature_extractors`: factories by name for this run,
    on top of the registries (`register_detector`, `register_feature_extractor`)."""
    run = Evaluation(cfg, detectors)
    try:
        return _evaluate(run, cfg, feature_extractors)
    finally:
        release(run.accelerator)  # the process group too: a gloo group left to the exit can abort the process


def _evaluate(run: Evaluation, cfg, feature_extractors) -> Report | None:
    # CLIP / FID load first, so a missing folder fails before generation; only the main process scores
    metrics = MetricSet.from_config(cfg, run.out, run.accelerator, feature_extractors)
    # (cell, attack name, kind of row, prompts in this run (None: an image folder), restart (None: no restarts))
    cells: list[tuple[Cell, str, str, int | None, int | None]] = []
    sources: dict[str, list] = {}  # label -> provenance of each third-party file loaded (the manifest's)
    for label, model_cfg in evaluated_models(cfg).items():
        if model_cfg.images:
            cell = Cell(label, IMAGES, run.out)
            run.run_image_folder(cell, model_cfg.images, run.prompts, run.detector)
            cells.append((cell, IMAGES, "concept", None, None))
            continue
        pipe = run.base_pipe() if is_plain_base(model_cfg) else load_evaluated(
            cfg.base, model_cfg, run.accelerator.device, sources.setdefault(label, []))
        for key, attack in cfg.attacks.items():
            restarts = attack_restarts(attack)
            for restart in range(restarts):  # one cell per restart, each resumable on its own
                cell = Cell(label, restart_cell(key, restart), run.out)
                run.run_cell(cell, pipe, attack, run.prompts, run.detector, restart)
                cells.append((cell, str(attack.name), "concept", len(run.prompts), restart if restarts > 1 else None))
        for name, (prompts, detector) in run.utility_sets.items():
            cell = Cell(label, name, run.out)
            run.run_cell(cell, pipe, NoAttackConfig(), prompts, detector)
            cells.append((cell, UTILITY, "utility", len(prompts), None))
        run.release(pipe)
    report = None
    if run.main:
        rows = [cell_row(cell, name, kind, n, metrics, restart) for cell, name, kind, n, restart in cells]
        report = Report(run.concept.name, run_manifest(run, metrics, sources), rows)
        write_report(report, run.out, cfg.generation.grid_prompts)
    run.accelerator.wait_for_everyone()
    return report


def run_manifest(run: Evaluation, metrics: MetricSet, sources: dict[str, list] | None = None) -> dict:
    """What makes the numbers reproducible: config, seeds, detector, attacks and their budgets, metrics, and
    each third-party file an evaluated model loaded (`model_sources`: path, sha256, hub revision and commit)."""
    cfg = run.cfg
    return build_manifest(
        OmegaConf.to_container(cfg, resolve=True), int(cfg.seed),
        concept=run.concept.name, detector=run.detector.describe(),
        utility_detector=run.utility_sets[UTILITY][1].describe() if UTILITY in run.utility_sets else None,
        **({"utility_sets": {name: {"n": len(prompts), "detector": detector.describe()}
                             for name, (prompts, detector) in run.utility_sets.items()}}
           if set(run.utility_sets) - {UTILITY} else {}),
        attacks={key: build_attack(settings).describe() for key, settings in cfg.attacks.items()},
        prompts={"source": run.prompt_source, "n": len(run.prompts), "seeds": [p.seed for p in run.prompts],
                 "guidance": [p.guidance for p in run.prompts]},
        generation=OmegaConf.to_container(cfg.generation), processes=run.accelerator.num_processes,
        metrics=metrics.describe(),
        model_sources={label: records for label, records in (sources or {}).items() if records},
    )
