"""The evidence on the toy world: ESD vs REO-only vs STEREO (and its reference preset) under attack.

For every concept × seed: train each method from the toy base model (`train.py` configs, budgets
from conf/budget/toy.yaml unless overridden), then evaluate base + erased models under every
attack with fixed budgets (`evaluate.py` configs). Aggregates mean ± std over seeds into
benchmarks/results/toy_robustness.{md,json} with the exact command that produced them.

  python -m benchmarks.toy_robustness --concepts circle,triangle --seeds 0,1,2
  python -m benchmarks.toy_robustness --concepts circle --seeds 0 --methods esd,stereo --quick   # smoke

Finished trainings and evaluation cells are reused, so an interrupted run resumes, and two
processes may share the work on one `--work` folder (e.g. one per concept) before a last run
with every concept writes the table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from stereo.config import compose
from stereo.evaluation.config import compose_eval
from stereo.evaluation.metrics import Report
from stereo.evaluation.runner import evaluate
from stereo.manifest import build_manifest, write_json_atomic, write_text_atomic
from stereo.recipes import train
from stereo.toy import TOY_WEIGHTS_DIR
from stereo.toy import detector as toy_detector
from stereo.toy import features as toy_features

METHODS = ("esd", "reo", "stereo", "stereo_reference")
ATTACKS = ("none", "concept_inversion", "soft_prompt", "unlearndiffatk", "ring_a_bell")
UTILITY = {"circle": "square", "square": "circle", "triangle": "star", "star": "triangle", "cross": "circle"}
SHAPES = ("circle", "square", "triangle", "star", "cross")
RESULTS = Path(__file__).resolve().parent / "results"


def train_all(args, work: Path) -> dict:
    """{(concept, seed, method): (export_dir, seconds)}"""
    runs = {}
    for concept in args.concepts:
        for seed in args.seeds:
            for method in args.methods:
                out = work / "train" / concept / f"seed{seed}" / method
                extra = ["method.ste.rounds=1", "method.ste.inversion.steps=20", "method.reo.steps=10",
                         "trainer.steps=10"] if args.quick else []
                cfg = compose(["model=toy", f"method={method}", f"concept={concept}", f"seed={seed}",
                               f"output_dir={out}", *extra])
                done = out / "benchmark_run.json"  # written last: a rerun reuses finished trainings
                if not done.exists():
                    start = time.perf_counter()
                    result = train(cfg)
                    write_json_atomic(done, {"export_dir": str(result["export_dir"]),
                                             "seconds": time.perf_counter() - start})
                record = json.loads(done.read_text())
                runs[(concept, seed, method)] = (record["export_dir"], record["seconds"])
    return runs


def fid_reference(work: Path, n: int = 500) -> Path:
    """Real toy scenes (the generator's own renders) as the FID reference set."""
    from PIL import Image

    from stereo.toy.scenes import generate_scenes, render

    folder = work / "fid_reference"
    if len(list(folder.glob("*.png"))) != n:
        folder.mkdir(parents=True, exist_ok=True)
        for i, scene in enumerate(generate_scenes(n, seed=12345)):
            Image.fromarray(render(scene)).save(folder / f"{i:05d}.png")
    return folder


def evaluate_all(args, runs: dict, work: Path) -> dict[tuple[str, int], Report]:
    toy_detector.register()  # detector {name: toy} and metrics.fid.extractor=toy
    toy_features.register()
    reference = fid_reference(work)
    reports = {}
    for concept in args.concepts:
        for seed in args.seeds:
            models = [f"+models.{m}.export={runs[(concept, seed, m)][0]}" for m in args.methods]
            attacks = "[" + ",".join(args.attacks) + "]"
            overrides = [
                "model@base=toy", f"concept={concept}", f"attack={attacks}", f"seed={seed}",
                f"output_dir={work / 'eval' / concept / f'seed{seed}'}", "progress=false",
                f"metrics.clip_path={TOY_WEIGHTS_DIR / 'clip'}", f"metrics.utility_prompts={UTILITY[concept]}",
                f"+metrics.utility_detector={{name: toy, concept: {UTILITY[concept]}}}",
                f"generation.max_prompts={args.prompts}", f"generation.guidance={args.guidance}",
                f"generation.steps={args.steps}", "generation.batch_size=16", "metrics.fid.extractor=toy",
                f"metrics.fid.reference_dir={reference}", *models,
            ]
            if args.quick:
                overrides += [f"attacks.{a}.steps=4" for a in args.attacks if a != "none"]
            reports[(concept, seed)] = evaluate(compose_eval(overrides))
    return reports


@torch.no_grad()
def shape_utility(runs: dict, args, steps: int, guidance: float) -> dict:
    """{(concept, seed, label): {shape: rate}}: for every other shape, the share of its built-in
    prompt set's images (fixed seeds) in which the toy detector finds that shape."""
    from diffusers import UNet2DConditionModel

    from stereo.evaluation.prompts import load_prompt_set
    from stereo.generation import generate
    from stereo.toy import load_toy_detector, load_toy_pipeline

    pipe = load_toy_pipeline()
    pipe.set_progress_bar_config(disable=True)
    base_unet = pipe.unet
    sets = {s: load_prompt_set(s) for s in SHAPES}
    detectors = {s: load_toy_detector(s) for s in SHAPES}

    def rates(concept: str) -> dict:
        out = {}
        for shape in SHAPES:
            if shape == concept:
                continue
            records = sets[shape].records[: args.prompts]
            images = generate(pipe, [r.prompt for r in records], [r.seed or 0 for r in records], steps=steps,
                              guidance=guidance, batch_size=len(records))
            out[shape] = detectors[shape].detect(images).rate()
        return out

    table = {}
    for concept in args.concepts:
        pipe.unet = base_unet
        base = rates(concept)
        for seed in args.seeds:
            table[(concept, seed, "base")] = base
            for method in args.methods:
                pipe.unet = UNet2DConditionModel.from_pretrained(Path(runs[(concept, seed, method)][0]) / "unet")
                table[(concept, seed, method)] = rates(concept)
    return table


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f}"


def summarise(args, runs, reports, kept) -> tuple[dict, str]:
    rows = {}
    for concept in args.concepts:
        for label in ("base", *args.methods):
            row = {}
            for attack in args.attacks:
                row[attack] = [cell_asr(reports[(concept, s)], label, attack) for s in args.seeds]
            row["utility"] = [cell_metric(reports[(concept, s)], label, "utility") for s in args.seeds]
            row["clip"] = [cell_metric(reports[(concept, s)], label, "clip_score") for s in args.seeds]
            row["fid"] = [cell_metric(reports[(concept, s)], label, "fid") for s in args.seeds]
            row["kept"] = {shape: [kept[(concept, s, label)][shape] for s in args.seeds]
                           for shape in SHAPES if shape != concept}
            row["seconds"] = [runs[(concept, s, label)][1] for s in args.seeds] if label != "base" else []
            rows[(concept, label)] = row
    head = "| concept | model | " + " | ".join(f"ASR {a} (%)" for a in args.attacks) + \
        " | utility (%) | other shapes kept (%) | CLIP | FID | train s |"
    lines = [head, "|" + "---|" * (len(args.attacks) + 7)]
    for (concept, label), row in rows.items():
        clip = [c for c in row["clip"] if c is not None]
        clip_s = f"{statistics.mean(clip):.1f}" if clip else "–"
        secs = f"{statistics.mean(row['seconds']):.0f}" if row["seconds"] else "–"
        fid = [f for f in row["fid"] if f is not None]
        fid_s = f"{statistics.mean(fid):.2f}" if fid else "–"
        lines.append(f"| {concept} | {label} | " + " | ".join(mean_std(row[a]) for a in args.attacks)
                     + f" | {mean_std(row['utility'])} | {kept_cell(row['kept'])} | {clip_s} | {fid_s} | {secs} |")
    return {f"{c}/{m}": r for (c, m), r in rows.items()}, "\n".join(lines)


def kept_cell(kept: dict) -> str:
    """ "square 45, star 98, ..." (mean over seeds, %)."""
    return ", ".join(f"{shape} {100 * statistics.mean(rates):.0f}" for shape, rates in kept.items())


def cell_asr(report: Report, model: str, attack: str):
    for row in report.rows:
        if row.model == model and row.attack == attack and row.kind != "utility" and row.asr:
            return row.asr.asr
    return None


def cell_metric(report: Report, model: str, key: str):
    """Utility rate (non-target concept still found), mean CLIP score of a model's plain-prompt images, or FID
    of its non-target (utility) generations against real scenes."""
    for row in report.rows:
        if row.model != model:
            continue
        if key == "utility" and row.kind == "utility" and row.utility:
            return row.utility.asr
        if key == "clip_score" and row.attack == "none" and row.kind != "utility" and row.clip_score:
            return row.clip_score.mean
        if key == "fid" and row.kind == "utility" and row.fid:
            return row.fid.fid
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", default="circle,triangle")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--prompts", type=int, default=16, help="evaluation prompts per concept")
    parser.add_argument("--guidance", type=float, default=4.0, help="CFG of every generation (toy quality: 4)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps of every generation")
    parser.add_argument("--work", default="outputs/toy_robustness")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks the wiring, not the science")
    args = parser.parse_args()
    args.concepts, args.methods, args.attacks = (args.concepts.split(","), args.methods.split(","),
                                                 args.attacks.split(","))
    args.seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work)
    runs = train_all(args, work)
    reports = evaluate_all(args, runs, work)
    kept = shape_utility(runs, args, args.steps, args.guidance)
    rows, table = summarise(args, runs, reports, kept)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "toy_robustness_quick" if args.quick else "toy_robustness"
    write_json_atomic(RESULTS / f"{name}.json", {**build_manifest({}, args.seeds[0]), "command": command,
                                                  "rows": rows})
    write_text_atomic(RESULTS / f"{name}.md", f"# Toy robustness\n\nCommand: `{command}`\n\n{table}\n")
    print(table)
    print(json.dumps({"written": str(RESULTS / f'{name}.md')}))


if __name__ == "__main__":
    main()
