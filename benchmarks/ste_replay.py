"""Did REO erase what STE found? Each STE round's adversarial token replayed against the base model, the
UNet of every STE round, and the run's final (REO) export, on the toy benchmark's trained STEREO runs.

A STEREO run stays open to attack for one of two reasons, and they call for different fixes:
- the final model still answers the tokens STE found (replay ASR on the export high): REO did not erase
  its negatives (REO's steps, weights, draws per negative);
- it no longer answers them, yet a fresh attack works: the evaluation's attack finds tokens STE never
  found (STE's search was not thorough enough: rounds, budget, restarts per round).

For every (concept, seed) of `--work` (a `benchmarks.toy_robustness` folder) and every token STE found
(round k's first token is `tokenK`, its j-th extra one `tokenK-j`): one
`evaluate.py` run of the `token_file` attack with that token on `base`, `round0..round{K-1}` (the
UNet STE erased in each round) and `final` (the export), the concept's evaluation prompts (the token in
the concept's inversion templates, the prompts' seeds), toy detector. The table gives each cell's ASR,
mean over seeds with a 95 % bootstrap CI, and per seed.

  python -m benchmarks.ste_replay --work outputs/toy_robustness --concepts square,star,cross --seeds 10,11,12,13,14
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import open_dict

from benchmarks.toy_robustness import RESULTS, SHAPES
from stereo.evaluation.config import compose_eval
from stereo.evaluation.runner import evaluate
from stereo.evaluation.stats import bootstrap_ci
from stereo.manifest import build_manifest, write_json_atomic, write_text_atomic
from stereo.recipes.ste_rounds import DONE, finished_rounds
from stereo.toy import detector as toy_detector


def replay_dir(work: Path, label: str, concept: str, seed: int) -> Path:
    """Where one STEREO run's replay lives: one folder per method label, so that two variants' replays on the
    same `--work` never share a round's UNet or a cell."""
    return work / "replay" / label / concept / f"seed{seed}"


def round_export(folder: Path, round_dir: Path) -> Path:
    """An export folder holding a round's erased subset (`delta.safetensors` is what `apply_export` reads),
    copied afresh from the run on every replay (never an older copy)."""
    folder = folder / "unets" / round_dir.name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(round_dir / "unet_delta.safetensors", folder / "delta.safetensors")
    return folder


def replay(args, work: Path, concept: str, seed: int, label: str) -> dict[str, dict[str, float]]:
    """{token round: {model: ASR}} for one trained STEREO run."""
    run = work / "train" / concept / f"seed{seed}" / label
    record = json.loads((run / "benchmark_run.json").read_text())
    rounds = finished_rounds(run / "ste")
    if not rounds:
        raise FileNotFoundError(f"{run}: no finished STE round (ste/round_k/{DONE}); is {label!r} a STEREO run?")
    out: dict[str, dict[str, float]] = {}
    folder = replay_dir(work, label, concept, seed)
    models = {f"round{i}": {"export": str(round_export(folder, unet_round))} for i, unet_round in enumerate(rounds)}
    models["final"] = {"export": record["export_dir"]}
    for k, token_round in enumerate(rounds):
        done = json.loads((token_round / DONE).read_text())
        for j, entry in enumerate(done["tokens"]):  # `method.ste.tokens_per_round` tokens per round
            name = f"token{k}" if j == 0 else f"token{k}-{j}"
            cfg = compose_eval([
                "model@base=toy", f"concept={concept}", "attack=[token_file]",
                f"attacks.token_file.token_file={token_round / entry['file']}", f"seed={seed}",
                f"output_dir={folder / name}", "progress=false",
                f"generation.max_prompts={args.prompts}", f"generation.guidance={args.guidance}",
                f"generation.steps={args.steps}", "generation.batch_size=16", "metrics.clip_path=null",
                "metrics.fid.reference_dir=null"])
            with open_dict(cfg.models):
                cfg.models.update(models)
            report = evaluate(cfg)
            out[name] = {row.model: row.rate.asr for row in report.rows if row.kind == "concept"}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="outputs/toy_robustness", help="a benchmarks.toy_robustness --work folder")
    parser.add_argument("--concepts", default="square,star,cross")
    parser.add_argument("--seeds", default="10,11,12,13,14")
    parser.add_argument("--label", default="stereo", help="the STEREO method's label in that folder")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    concepts, seeds = args.concepts.split(","), [int(s) for s in args.seeds.split(",")]
    if set(concepts) - set(SHAPES):
        parser.error(f"concepts {concepts}: toy shapes are {SHAPES}")
    # resolved: a cell records its token file's path, which must be spelled the same way on every run
    began, work = time.perf_counter(), Path(args.work).resolve()
    toy_detector.register()
    values = {c: {s: replay(args, work, c, s, args.label) for s in seeds} for c in concepts}
    lines = ["| concept | token | " + " | ".join(values[concepts[0]][seeds[0]]["token0"]) + " |"]
    lines.append("|---|---|" + "---|" * len(values[concepts[0]][seeds[0]]["token0"]))
    summary: dict = {}
    for c in concepts:
        for token in values[c][seeds[0]]:
            cells = []
            for model in values[c][seeds[0]][token]:
                per_seed = [values[c][s][token][model] for s in seeds]
                interval = bootstrap_ci(np.array(per_seed)[:, None], n_boot=10_000, seed=0).scaled(100)
                summary.setdefault(c, {}).setdefault(token, {})[model] = {
                    "per_seed": per_seed, "mean": interval.estimate, "low": interval.low, "high": interval.high}
                cells.append(f"{interval.estimate:.1f} [{interval.low:.1f}, {interval.high:.1f}] "
                             f"({' / '.join(f'{100 * v:.0f}' for v in per_seed)})")
            lines.append(f"| {c} | {token} | " + " | ".join(cells) + " |")
    seconds = time.perf_counter() - began
    command = "python -m benchmarks.ste_replay " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                                                                     else argv))
    table = "\n".join(lines)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results / "ste_replay.json", {**build_manifest({}, seeds[0]), "command": command,
                                                    "wall_seconds": seconds, "replay": summary})
    write_text_atomic(results / "ste_replay.md", (
        f"# STE tokens replayed\n\nCommand: `{command}`  \nWall time: {seconds / 60:.1f} min\n\n"
        f"ASR % of each token STE found (rows; tokenK-j: round K's token j) on each model (columns): mean over "
        f"training seeds "
        f"{', '.join(map(str, seeds))} [95 % bootstrap CI] (per seed). roundK = the UNet STE erased in round K "
        f"(token K was found against roundK); final = the run's export (REO from the original UNet). "
        f"{args.prompts} prompts per concept, DDIM {args.steps}, guidance {args.guidance}, toy detector.\n\n"
        f"{table}\n"))
    print(table)


if __name__ == "__main__":
    main()
