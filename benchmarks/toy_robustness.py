"""The evidence on the toy world: ESD vs REO-only vs STEREO (and its reference preset) under attack, with
intervals, on a held-out protocol.

Protocol (issue 13). Anything may be tuned on the tune split; the held-out split, which nothing was
tuned on, is what the results claim:
  --tune      concepts circle, triangle   seeds 0, 1, 2
  --heldout   concepts square, star, cross   seeds 10, 11, 12, 13, 14
For every concept × seed: train each method from the toy base model (`train.py` configs, budgets from
conf/budget/toy.yaml plus each method's overrides). Then, per concept, one evaluation (`evaluate.py`
configs) of the base model and every (method, seed) model under every attack with fixed budgets; the
token attacks (concept inversion, soft prompt, UnlearnDiffAtk) run `--restarts` independent restarts
(default 5). Every model meets the same attack seeds (`--attack-seed`, restart r its own), gallery and
prompts, so differences are paired; the base model (it has no training seed) and the Ring-A-Bell search
(black-box: its prompts do not depend on the evaluated model) run once per concept. Each model is also
evaluated on every other shape of the world (its prompt set without the prompts that name the erased
concept, the toy detector of that shape): utility = that shape's rate as % of the base model's.

Per method the table gives: pre-attack ASR; worst-case post-attack ASR over the attacks (each attack's
mean over seeds × restarts, the largest; `stereo.evaluation.stats`: hierarchical bootstrap 95 % CI);
its paired difference to ESD and to REO-only (same seeds, prompts and restarts; bootstrap CI); every
other shape's utility and the worst one (% of base, CI over seeds). Also an ASR-vs-utility plot
(one point per method, CI bars), the exact command and the wall time.

  python -m benchmarks.toy_robustness --tune                 # tune split
  python -m benchmarks.toy_robustness --heldout              # held-out split: the reported numbers
  python -m benchmarks.toy_robustness --heldout --method 'stereo+preserve:method=stereo,method.preserve.weight=1.0'
  python -m benchmarks.toy_robustness --heldout --once unlearndiffatk      # UnlearnDiffAtk once: about 1/3 the cost
  python -m benchmarks.toy_robustness --concepts circle --seeds 0 --quick --restarts 2 --results /tmp/tr  # smoke

`--methods` lists method presets (conf/method/<name>.yaml); each `--method 'LABEL:OVERRIDE,OVERRIDE'`
(repeatable) adds a method trained with `train.py` overrides (one of them `method=<preset>`; a comma
inside [...] or {...} does not split). A method is its preset as published plus its overrides: the
settings `train.py` adds for a (model, method) pair (conf/tuned/, e.g. the toy STEREO default) are left out
(`~tuned`) unless the overrides name `tuned=...`. Finished trainings (checked against their overrides) and
evaluation cells are reused, so an interrupted run resumes, and several processes may share the work on
one `--work` folder (e.g. one per concept) before a last run with every concept writes the table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from omegaconf import open_dict

from stereo.config import compose
from stereo.evaluation.config import compose_eval
from stereo.evaluation.layout import restart_cell
from stereo.evaluation.metrics import Report
from stereo.evaluation.prompts import load_prompt_set
from stereo.evaluation.runner import evaluate
from stereo.evaluation.stats import Interval, bootstrap_ci, least_of_means, paired_difference, worst_of_means
from stereo.manifest import build_manifest, write_json_atomic, write_text_atomic
from stereo.recipes import train
from stereo.toy import TOY_WEIGHTS_DIR
from stereo.toy import detector as toy_detector
from stereo.toy import features as toy_features

PRESETS = ("esd", "reo", "stereo", "stereo_reference")  # method presets compared
SPLITS = {"tune": (("circle", "triangle"), (0, 1, 2)), "heldout": (("square", "star", "cross"), (10, 11, 12, 13, 14))}
ATTACKS = ("none", "concept_inversion", "soft_prompt", "unlearndiffatk", "ring_a_bell")
TOKEN_ATTACKS = ("concept_inversion", "soft_prompt", "unlearndiffatk")  # run with restarts
SHAPES = ("circle", "square", "triangle", "star", "cross")
BASELINES = ("esd", "reo")  # paired differences are taken against these (`--versus` adds others)
NAMES = {"esd": "ESD", "reo": "REO-only"}  # column names of the baselines
RESULTS = Path(__file__).resolve().parent / "results"
BOOT = dict(n_boot=10_000, seed=0)  # every interval: 10k resamples, numpy seed 0


@dataclass(frozen=True)
class Method:
    """A compared method: its label (folder, table row) and its `train.py` overrides."""

    label: str
    overrides: tuple[str, ...]


def split_overrides(text: str) -> list[str]:
    """`a=1,b=[x,y],c={k: v}` -> ["a=1", "b=[x,y]", "c={k: v}"]: commas split only outside brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def parse_method(spec: str) -> Method:
    """`esd` (a preset) or `LABEL:OVERRIDE,OVERRIDE` (train.py overrides, `method=<preset>` among them unless
    LABEL is a preset) -> Method."""
    label, colon, rest = spec.partition(":")
    label = label.strip()
    overrides = split_overrides(rest) if colon else []
    if not label or any(c in label for c in "/ ") or label == "base":
        raise ValueError(f"method {spec!r}: the label {label!r} must be a plain name (no '/' or space), not 'base'")
    if not any(override_key(o) == "method" for o in overrides):
        if label not in PRESETS and not Path(__file__).resolve().parents[1].joinpath(
                "conf", "method", f"{label}.yaml").is_file():
            raise ValueError(f"method {spec!r}: {label!r} is no method preset (conf/method/); give one, e.g. "
                             f"'{label}:method=stereo,method.preserve.weight=1.0'")
        overrides = [f"method={label}", *overrides]
    if not any(override_key(o) == "tuned" for o in overrides):
        overrides.append(PUBLISHED)
    return Method(label, tuple(overrides))


PUBLISHED = "~tuned"  # a compared method without train.py's tuned (model, method) settings (conf/tuned/)


def override_key(override: str) -> str:
    """`method.subset` of `+method.subset=x`, `tuned` of `~tuned`."""
    return override.split("=", 1)[0].lstrip("+~")


# --- training and evaluation ----------------------------------------------------------------------
QUICK_TRAIN = ["method.ste.rounds=1", "method.ste.inversion.steps=20", "method.reo.steps=10", "trainer.steps=10"]


def train_all(args, work: Path) -> dict:
    """{(concept, seed, label): (export_dir, seconds)}; a finished training is reused if its overrides match."""
    runs = {}
    for concept in args.concepts:
        for seed in args.seeds:
            for method in args.methods:
                out = work / "train" / concept / f"seed{seed}" / method.label
                overrides = ["model=toy", *method.overrides, f"concept={concept}", f"seed={seed}",
                             *(QUICK_TRAIN if args.quick else [])]
                done = out / "benchmark_run.json"  # written last: a rerun reuses finished trainings
                cfg = compose([*overrides, f"output_dir={out}"])
                if done.exists():
                    record = json.loads(done.read_text())
                    check_finished(out, overrides, record.get("overrides", overrides), cfg)
                else:
                    start = time.perf_counter()
                    result = train(cfg)
                    record = {"export_dir": str(result["export_dir"]), "overrides": overrides,
                              "seconds": time.perf_counter() - start}
                    write_json_atomic(done, record)
                runs[(concept, seed, method.label)] = (record["export_dir"], record["seconds"])
    return runs


TRAINING_SETTINGS = ("model", "method", "concepts", "trainer")  # what a finished training must still match


def changed_settings(cfg, saved: Path) -> list[str]:
    """Dotted keys of `TRAINING_SETTINGS` whose value in `cfg` differs from a finished run's resolved config
    (`saved`, its config.yaml). Keys the saved config lacks (written before the setting existed) are skipped."""
    from omegaconf import OmegaConf

    def walk(old, new, prefix):
        if isinstance(old, dict) and isinstance(new, dict):
            for key in old.keys() & new.keys():
                yield from walk(old[key], new[key], f"{prefix}.{key}")
        elif old != new:
            yield prefix

    old = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    new = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return [key for section in TRAINING_SETTINGS if section in old
            for key in walk(old[section], new.get(section), section)]


def check_finished(out: Path, overrides: list[str], trained_with: list[str], cfg) -> None:
    """A finished training is reused only if it was run with the same overrides and, the configs' defaults
    (budgets, presets) having maybe changed since, still resolves to the same settings. Runs recorded before
    conf/tuned/ existed lack `~tuned`; what they trained with is checked by the settings."""
    if [o for o in trained_with if o != PUBLISHED] != [o for o in overrides if o != PUBLISHED]:
        raise ValueError(f"{out} was trained with {trained_with}, not {overrides}; use another label or --work, "
                         "or delete that folder")
    changed = changed_settings(cfg, out / "config.yaml") if (out / "config.yaml").exists() else []
    if changed:
        raise ValueError(f"{out} was trained before the configs changed ({', '.join(changed)} differ from what "
                         f"{overrides} gives now); delete that folder to retrain it, or use another --work")


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


def utility_prompts(work: Path, concept: str, shape: str) -> Path:
    """`shape`'s prompt set without the prompts that also name `concept` (seeds kept): a prompt asking for
    both would measure the erasure and the shape at once."""
    import csv
    import io

    records = [r for r in load_prompt_set(shape).records if concept not in r.prompt.split()]
    path = work / "prompts" / f"{shape}_without_{concept}.csv"
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["prompt", "evaluation_seed", "evaluation_guidance", "categories"])
    for r in records:
        writer.writerow([r.prompt, r.seed, "" if r.guidance is None else r.guidance, ", ".join(r.categories)])
    write_text_atomic(path, text.getvalue())  # atomic: processes sharing --work read it while another writes
    return path


def model_name(label: str, seed: int) -> str:
    """The evaluated model of a method trained with `seed` (the base model has no training seed)."""
    return "base" if label == "base" else f"{label}_seed{seed}"


def eval_overrides(args, concept: str, work: Path, reference: Path) -> list[str]:
    attacks = "[" + ",".join(args.attacks) + "]"
    overrides = [
        "model@base=toy", f"concept={concept}", f"attack={attacks}", f"seed={args.attack_seed}",
        f"output_dir={work / 'eval' / concept}", "progress=false",
        f"metrics.clip_path={TOY_WEIGHTS_DIR / 'clip'}", f"generation.max_prompts={args.prompts}",
        f"generation.guidance={args.guidance}", f"generation.steps={args.steps}", "generation.batch_size=16",
        "metrics.fid.extractor=toy", f"metrics.fid.reference_dir={reference}",
        *[f"attacks.{a}.restarts={args.restarts_of[a]}" for a in args.attacks if a in TOKEN_ATTACKS],
        # all 32 prompts in one batch: each prompt's prefix is optimised on its own either way (Adam per
        # weight), batching only amortises the per-step cost (~1.5x faster on the toy)
        *(["attacks.unlearndiffatk.prompt_batch=32"] if "unlearndiffatk" in args.attacks else []),
    ]
    if args.quick:
        overrides += [f"attacks.{a}.steps=4" for a in args.attacks if a != "none"]
        overrides += [f"attacks.{a}.gallery_size=8" for a in args.attacks if a in TOKEN_ATTACKS]
    return overrides


def evaluate_all(args, runs: dict, work: Path) -> dict[str, Report]:
    """One report per concept: the base model and every (method, seed) model (`model_name`)."""
    toy_detector.register()  # detector {name: toy} and metrics.fid.extractor=toy
    toy_features.register()
    reference = fid_reference(work)
    reports = {}
    for concept in args.concepts:
        cfg = compose_eval(eval_overrides(args, concept, work, reference))
        with open_dict(cfg.models):  # set on the config: labels need not be Hydra key names
            for seed in args.seeds:
                for method in args.methods:
                    cfg.models[model_name(method.label, seed)] = {"export": runs[(concept, seed, method.label)][0]}
        cfg.metrics.utility_sets = {shape: {"prompts": str(utility_prompts(work, concept, shape)),
                                            "detector": {"name": "toy", "concept": shape}}
                                    for shape in SHAPES if shape != concept}
        reports[concept] = evaluate(cfg)
    return reports


# --- numbers --------------------------------------------------------------------------------------
def rate(report: Report, model: str, attack: str, kind: str = "concept") -> float:
    for row in report.rows:
        if row.model == model and row.attack == attack and row.kind == kind and row.rate is not None:
            return row.rate.asr
    raise KeyError(f"no {kind} row ({model}, {attack}) in the report of {report.concept}")


def attack_matrix(args, reports, concept: str, label: str) -> np.ndarray:
    """(seeds, restarts, post-attack attacks) ASR; an attack run once repeats along the restart axis
    (no restart variance)."""
    post = [a for a in args.attacks if a != "none"]
    restarts = max([1] + [args.restarts_of[a] for a in post if a in TOKEN_ATTACKS])
    out = np.zeros((len(args.seeds), restarts, len(post)))
    for i, seed in enumerate(args.seeds):
        for k, attack in enumerate(post):
            for r in range(restarts):
                cell = restart_cell(attack, r) if args.restarts_of.get(attack, 1) > 1 else attack
                out[i, r, k] = rate(reports[concept], model_name(label, seed), cell)
    return out


def utility_matrix(args, reports, concept: str, label: str) -> np.ndarray:
    """(seeds, 1, other shapes): each other shape's rate as a share of the base model's on the same prompts."""
    shapes = [s for s in SHAPES if s != concept]
    out = np.zeros((len(args.seeds), 1, len(shapes)))
    for i, seed in enumerate(args.seeds):
        for k, shape in enumerate(shapes):
            base = rate(reports[concept], "base", f"utility-{shape}", "utility")
            kept = rate(reports[concept], model_name(label, seed), f"utility-{shape}", "utility")
            out[i, 0, k] = kept / base if base > 0 else np.nan
    return out


def summarise_concept(args, reports, runs, concept: str) -> dict:
    """Per model label: every number of the tables, with intervals and the raw per-seed values."""
    post = [a for a in args.attacks if a != "none"]
    shapes = [s for s in SHAPES if s != concept]
    matrices = {label: attack_matrix(args, reports, concept, label) for label in ["base", *args.labels]} \
        if post else {}
    out = {}
    for label in ["base", *args.labels]:
        row: dict = {}
        if "none" in args.attacks:
            pre = [rate(reports[concept], model_name(label, s), "none") for s in args.seeds]
            row["pre_attack"] = bootstrap_ci(pre, **BOOT)
            row["pre_attack_values"] = pre
        if post:
            values = matrices[label]
            means = values.mean(axis=(0, 1))
            row["worst_attack"] = post[int(means.argmax())]
            row["worst_case"] = bootstrap_ci(values, worst_of_means, **BOOT)
            row["attacks"] = {a: {"mean": bootstrap_ci(values[:, :, k], **BOOT),
                                  "best_of_restarts": float(values[:, :, k].max(axis=1).mean()),
                                  "per_restart": values[:, :, k].mean(axis=0).tolist(),
                                  "values": values[:, :, k].tolist()} for k, a in enumerate(post)}
            row["vs"] = {b: paired_difference(values, matrices[b], worst_of_means, **BOOT)
                         for b in args.versus if b in matrices and b != label}
        if label != "base":
            kept = utility_matrix(args, reports, concept, label)
            finite = ~np.isnan(kept).any(axis=(0, 1))
            row["utility"] = {shape: bootstrap_ci(kept[:, :, k], **BOOT) if finite[k] else None
                              for k, shape in enumerate(shapes)}
            row["utility_worst"] = bootstrap_ci(kept[:, :, finite], least_of_means, **BOOT) if finite.any() else None
            row["utility_values"] = {shape: kept[:, 0, k].tolist() for k, shape in enumerate(shapes)}
            row["train_seconds"] = statistics.mean(runs[(concept, s, label)][1] for s in args.seeds)
        names = {model_name(label, s) for s in args.seeds}
        clip = [r.clip_score.mean for r in reports[concept].rows
                if r.model in names and r.attack == "none" and r.clip_score]
        fid = [r.fid.fid for r in reports[concept].rows if r.model in names and r.kind == "utility" and r.fid]
        row["clip"] = statistics.mean(clip) if clip else None
        row["fid"] = statistics.mean(fid) if fid else None
        out[label] = row
    out["_matrices"] = matrices
    return out


def pooled(args, per_concept: dict) -> dict:
    """Over every concept (same seeds): the mean over concepts of each concept's worst-case ASR, and the
    least-kept other shape of any concept; seeds resampled jointly across concepts."""
    if len(args.concepts) < 2 or not any(a != "none" for a in args.attacks):
        return {}

    def worst_mean(x):  # (B, S, R, C, A) -> (B,)
        return x.mean(axis=(1, 2)).max(axis=-1).mean(axis=-1)

    stack = {label: np.stack([per_concept[c]["_matrices"][label] for c in args.concepts], axis=2)
             for label in ["base", *args.labels]}
    out = {}
    for label in ["base", *args.labels]:
        row = {"worst_case": bootstrap_ci(stack[label], worst_mean, **BOOT),
               "vs": {b: paired_difference(stack[label], stack[b], worst_mean, **BOOT)
                      for b in args.versus if b in stack and b != label}}
        if label != "base":
            kept = np.concatenate([np.array(list(per_concept[c][label]["utility_values"].values())).T
                                   for c in args.concepts], axis=1)[:, None, :]  # (seeds, 1, concepts x shapes)
            kept = kept[:, :, ~np.isnan(kept).any(axis=(0, 1))]
            row["utility_worst"] = bootstrap_ci(kept, least_of_means, **BOOT) if kept.size else None
            row["utility_mean"] = bootstrap_ci(kept, **BOOT) if kept.size else None
        out[label] = row
    return out


# --- tables and plot ------------------------------------------------------------------------------
def pct(interval: Interval | None, signed: bool = False) -> str:
    if interval is None:
        return "–"
    i = interval.scaled(100)
    sign = "+" if signed else ""
    return f"{i.estimate:{sign}.1f} [{i.low:{sign}.1f}, {i.high:{sign}.1f}]"


def tables(args, per_concept: dict, pool: dict) -> str:
    post = [a for a in args.attacks if a != "none"]
    versus = "".join(f" Δ vs {NAMES.get(b, b)} (pp) |" for b in args.versus)
    head = (f"| concept | method | pre-attack ASR % | worst-case post-attack ASR % (attack) |{versus} "
            "other shapes kept, % of base | worst shape % | CLIP | FID | train s |")
    lines = [head, "|" + "---|" * (9 + len(args.versus))]
    for concept in args.concepts:
        for label in ["base", *args.labels]:
            row = per_concept[concept][label]
            worst = f"{pct(row.get('worst_case'))} ({row['worst_attack']})" if post else "–"
            vs = "".join(f" {pct(row.get('vs', {}).get(b), signed=True)} |" for b in args.versus)
            kept = ", ".join(f"{s} {pct(i)}" for s, i in row.get("utility", {}).items()) or "100 (reference)"
            lines.append(f"| {concept} | {label} | {pct(row.get('pre_attack'))} | {worst} |{vs} "
                         f"{kept} | {pct(row.get('utility_worst'))} | {number(row['clip'], 1)} | "
                         f"{number(row['fid'], 2)} | {number(row.get('train_seconds'), 0)} |")
    if pool:
        lines += ["", f"All concepts ({', '.join(args.concepts)}): mean over concepts of the worst-case ASR; the "
                      "least-kept other shape of any concept and the mean over every (concept, other shape).", "",
                  f"| method | worst-case ASR % |{versus} worst shape % | mean shape % |",
                  "|---|---|" + "---|" * len(args.versus) + "---|---|"]
        for label, row in pool.items():
            vs = "".join(f" {pct(row['vs'].get(b), True)} |" for b in args.versus)
            lines.append(f"| {label} | {pct(row['worst_case'])} |{vs} {pct(row.get('utility_worst'))} | "
                         f"{pct(row.get('utility_mean'))} |")
    if post:
        lines += ["", "Per attack: mean over seeds × restarts [95 % CI]; best of R = the mean over seeds of the best "
                      "restart (an attacker who keeps the most successful of R restarts); per restart = mean over "
                      "seeds of each restart.", "",
                  "| concept | method | attack | ASR % | best of R % | per restart % |", "|---|---|---|---|---|---|"]
        for concept in args.concepts:
            for label in ["base", *args.labels]:
                for attack, cell in per_concept[concept][label]["attacks"].items():
                    restarts = ", ".join(f"{100 * v:.0f}" for v in cell["per_restart"]) \
                        if args.restarts_of.get(attack, 1) > 1 else "–"
                    lines.append(f"| {concept} | {label} | {attack} | {pct(cell['mean'])} | "
                                 f"{100 * cell['best_of_restarts']:.1f} | {restarts} |")
    return "\n".join(lines)


def number(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def plot(args, per_concept: dict, pool: dict):
    """Worst-case post-attack ASR (x) against the worst other shape's utility (y), one point per method
    with its 95 % CI bars; one panel per concept (and one for all concepts)."""

    from stereo.evaluation.report import scatter, side_by_side

    panels = []
    sources = [(c, per_concept[c]) for c in args.concepts] + ([("all", pool)] if pool else [])
    for title, rows in sources:
        data, errors = [], []
        for label in args.labels:
            row = rows[label]
            x, y = row.get("worst_case"), row.get("utility_worst")
            if x is None or y is None:
                continue
            x, y = x.scaled(100), y.scaled(100)
            data.append((label, x.estimate, y.estimate))
            errors.append((x.low, x.high, y.low, y.high))
        if data:
            panels.append(scatter(data, "worst-case post-attack ASR %", "worst other shape, % of base",
                                  errors=errors, title=title))
    return side_by_side(panels)


def to_json(value):
    """Intervals and arrays as plain JSON."""
    if isinstance(value, Interval):
        return asdict(value)
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


# --- command line ---------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--tune", action="store_true", help="concepts circle,triangle; seeds 0,1,2")
    split.add_argument("--heldout", action="store_true", help="concepts square,star,cross; seeds 10..14")
    parser.add_argument("--concepts", help="comma-separated (overrides the split's)")
    parser.add_argument("--seeds", help="comma-separated training seeds (overrides the split's)")
    parser.add_argument("--methods", default=",".join(PRESETS), help="method presets, comma-separated")
    parser.add_argument("--method", action="append", default=[], metavar="LABEL:OVERRIDES",
                        help="an extra method: label and train.py overrides, e.g. "
                             "'stereo+preserve:method=stereo,method.preserve.weight=1.0' (repeatable)")
    parser.add_argument("--versus", default=",".join(BASELINES),
                        help="labels every method is compared with, paired (comma-separated)")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--restarts", type=int, default=5, help="independent restarts of each token attack")
    parser.add_argument("--once", default="", metavar="ATTACKS",
                        help="token attacks run once instead (comma-separated, e.g. unlearndiffatk: its prompts "
                             "already start from their own random prefixes; it costs most)")
    parser.add_argument("--attack-seed", type=int, default=0,
                        help="the attacks' seed (restart r: its own seed from it), the same for every model")
    parser.add_argument("--prompts", type=int, default=32, help="evaluation prompts per concept and per other shape")
    parser.add_argument("--guidance", type=float, default=4.0, help="CFG of every generation (toy quality: 4)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps of every generation")
    parser.add_argument("--work", default="outputs/toy_robustness")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the .md / .json / .png results")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks the wiring, not the science")
    args = parser.parse_args(argv)
    args.split = "tune" if args.tune else "heldout" if args.heldout else None
    concepts, seeds = SPLITS[args.split] if args.split else SPLITS["tune"]
    args.concepts = args.concepts.split(",") if args.concepts else list(concepts)
    args.seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(seeds)
    args.methods = [parse_method(m) for m in args.methods.split(",") if m] + [parse_method(m) for m in args.method]
    args.labels = [m.label for m in args.methods]
    if len(set(args.labels)) != len(args.labels):
        parser.error(f"method labels must differ: {args.labels}")
    args.versus = [b for b in args.versus.split(",") if b]
    args.attacks = args.attacks.split(",")
    once = [a for a in args.once.split(",") if a]
    if set(once) - set(TOKEN_ATTACKS):
        parser.error(f"--once {args.once}: only token attacks {TOKEN_ATTACKS} have restarts")
    args.restarts_of = {a: 1 if a in once else args.restarts for a in TOKEN_ATTACKS}
    unknown = set(args.attacks) - set(ATTACKS)
    if unknown or set(args.concepts) - set(SHAPES) or args.restarts < 1:
        parser.error(f"attacks {sorted(unknown)} / concepts {args.concepts} / restarts {args.restarts}: "
                     f"attacks from {ATTACKS}, concepts from {SHAPES}, restarts >= 1")
    return args


def main(argv=None) -> None:
    began = time.perf_counter()
    args = parse_args(argv)
    work = Path(args.work)
    runs = train_all(args, work)
    reports = evaluate_all(args, runs, work)
    per_concept = {c: summarise_concept(args, reports, runs, c) for c in args.concepts}
    pool = pooled(args, per_concept)
    table = tables(args, per_concept, pool)
    seconds = time.perf_counter() - began
    command = "python -m benchmarks.toy_robustness " + " ".join(shlex.quote(a) for a in (
        sys.argv[1:] if argv is None else argv))
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    name = "toy_robustness" + (f"_{args.split}" if args.split else "") + ("_quick" if args.quick else "")
    protocol = (f"Concepts {', '.join(args.concepts)}; training seeds {', '.join(map(str, args.seeds))}; "
                f"{args.restarts} restart(s) of each token attack, attack seed {args.attack_seed} for every model"
                f"{f' (once: {args.once})' if args.once else ''}; {args.prompts} prompts per concept and per "
                f"other shape (the other shape's set without prompts naming the concept); DDIM {args.steps}, "
                f"guidance {args.guidance}; toy detector. Intervals: 95 % percentile bootstrap, 10,000 "
                "resamples, seeds then restarts within seeds (`stereo.evaluation.stats`); prompts fixed.")
    figure = plot(args, per_concept, pool)
    if figure is not None:
        figure.save(results / f"{name}.png")
    write_json_atomic(results / f"{name}.json", {
        **build_manifest({}, args.seeds[0]), "command": command, "wall_seconds": seconds, "protocol": protocol,
        "split": args.split, "methods": [asdict(m) for m in args.methods], "concepts": to_json(per_concept),
        "all_concepts": to_json(pool)})
    write_text_atomic(results / f"{name}.md", f"# Toy robustness{f' ({args.split})' if args.split else ''}\n\n"
                      f"Command: `{command}`  \nWall time: {seconds / 60:.1f} min\n\n{protocol}\n\n{table}\n"
                      + (f"\n![ASR vs utility]({name}.png)\n" if figure is not None else ""))
    print(table)
    print(json.dumps({"written": str(results / f"{name}.md"), "wall_seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
