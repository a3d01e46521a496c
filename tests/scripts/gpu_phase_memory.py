"""Peak CUDA memory of every phase of the real recipes on SD 1.4's architecture (run by scripts/gpu_check.sh).

    python tests/scripts/gpu_phase_memory.py --out benchmarks/results [--rounds 4] [--attacks] [--run-id ID]

Runs, on `model=sd14-random` (SD 1.4's configs, random weights: no download) at 512 px with
trainer=gpu exactly as users run it (batch 4, bf16 autocast, gradient checkpointing, DDIM 50 x_t
chains) and CPU-free step counts: ESD-u (`method=esd concept=nudity`), then STEREO with `--rounds`
STE rounds and REO, then (with `--attacks`) evaluate.py's white-box attacks on the base model.
Each phase is one call of a recipe function, wrapped where the recipes call it; the wrapper resets
torch's peak counter before the phase and reads `torch.cuda.max_memory_allocated()` after it, and
also records what stays allocated after the phase (a growing value across STE rounds means a
round's model or optimiser was not released). Writes gpu_phase_memory.{json,md} into --out after
EVERY phase (atomically), so a run cut short by a time limit keeps what it measured; `complete` says
whether every recipe finished, `recipes` how far each got, `run_id` (--run-id, default
$GPU_CHECK_RUN_ID) which run wrote the file. sd14-random is built once and copied for every load.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
GIB = 2**30
SD14 = ["model=sd14-random", "model.resolution=512", "model.dtype=bf16", "trainer=gpu", "concept=nudity",
        "trainer.checkpoint_every=0", "trainer.sample_steps=2", "export.formats=[delta]"]
ATTACKS = ("concept_inversion", "soft_prompt", "unlearndiffatk")  # evaluate.py's white-box attacks measured


class PhaseMemory:
    """Peak and retained CUDA memory per named phase; nested phases count toward the outermost one."""

    def __init__(self, on_phase=lambda: None):
        self.phases: dict[str, dict] = {}
        self.depth = 0
        self.on_phase = on_phase  # called after every phase (gpu_phase_memory.py saves its results there)

    def wrap(self, fn, label):
        @functools.wraps(fn)
        def measured(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            name = label(*args, **kwargs)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            began, before = time.perf_counter(), torch.cuda.memory_allocated()
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                torch.cuda.synchronize()
                entry = self.phases.setdefault(name, {"peak_gib": 0.0, "calls": 0, "seconds": 0.0})
                entry["peak_gib"] = max(entry["peak_gib"], torch.cuda.max_memory_allocated() / GIB)
                entry["allocated_before_gib"] = before / GIB
                entry["allocated_after_gib"] = torch.cuda.memory_allocated() / GIB
                entry["calls"] += 1
                entry["seconds"] += time.perf_counter() - began
                self.on_phase()

        return measured

    def instrument(self, owner, attribute: str, label) -> None:
        """Wrap `owner.attribute` and every stereo module's imported reference to the same function."""
        original = getattr(owner, attribute)
        wrapped = self.wrap(original, label)
        setattr(owner, attribute, wrapped)
        for name, module in list(sys.modules.items()):
            if name.startswith("stereo") and getattr(module, attribute, None) is original:
                setattr(module, attribute, wrapped)


def instrument_recipes(memory: PhaseMemory) -> None:
    import stereo.attacks.gallery as gallery
    import stereo.attacks.inversion as inversion
    import stereo.erasure.previews as previews
    import stereo.evaluation.runner  # noqa: F401  (imports every evaluation module, so their references get wrapped)
    import stereo.generation as generation
    import stereo.recipes  # noqa: F401  (imports every recipe module, so their references get wrapped)
    from stereo.erasure.context import RunContext
    from stereo.erasure.trainer import ErasureTrainer
    from stereo.evaluation.cells import Evaluation

    memory.instrument(ErasureTrainer, "run", lambda self: f"train: {self.settings.desc}")
    memory.instrument(inversion, "learn_token", lambda *a, **k: f"inversion: {k.get('token') or a[2]}")
    memory.instrument(gallery, "concept_gallery", lambda *a, **k: "generation: concept gallery")
    memory.instrument(RunContext, "export", lambda self, *a, **k: "export")
    memory.instrument(previews, "save_samples", lambda ctx, unet, prompts, name, *a, **k: f"samples: {name}")
    memory.instrument(generation, "generate", lambda *a, **k: "generation: other")
    memory.instrument(Evaluation, "run_cell", lambda self, cell, *a, **k: f"attack: {cell.attack}")


def build_sd14_random_once() -> None:
    """Every load of model=sd14-random gets a copy of ONE build (random init of 1 B parameters on the CPU takes
    seconds per load; the recipes and the evaluation load it several times)."""
    import stereo.models.loading as loading

    build, built = loading.sd14_random_pipeline, {}

    def cached(seed: int = 0):
        if seed not in built:
            built[seed] = build(seed=seed)
        return copy.deepcopy(built[seed])

    loading.sd14_random_pipeline = cached


def run_recipes(out: Path, rounds: int, attacks: bool, recipes: dict[str, str], save) -> None:
    from stereo.config import compose
    from stereo.recipes import train

    def running(name):
        recipes[name] = "running"
        save()

    def done(name):
        recipes[name] = "done"
        save()

    running("esd")
    train(compose([*SD14, "method=esd", "trainer.steps=2", f"output_dir={out / 'esd'}"]))
    done("esd")
    running("stereo")
    train(compose([*SD14, "method=stereo", f"method.ste.rounds={rounds}", "method.ste.erase_steps=2",
                   "method.ste.gallery_size=4", "method.ste.gallery_steps=10", "method.ste.inversion.steps=2",
                   "method.reo.steps=2", f"output_dir={out / 'stereo'}"]))
    done("stereo")
    if attacks:
        from stereo.evaluation.config import compose_eval
        from stereo.evaluation.runner import evaluate

        running("attacks")
        small = ["steps=2", "gallery_size=2", "gallery_steps=10"]
        evaluate(compose_eval([
            "concept=nudity", "model@base=sd14-random", "base.resolution=512",
            f"attack=[{','.join(ATTACKS)}]", "generation.steps=10",
            "generation.max_prompts=2", "progress=false", "attacks.unlearndiffatk.project_every=1",
            *[f"attacks.{a}.{s}" for a in ATTACKS for s in small],
            f"output_dir={out / 'eval'}"]))
        done("attacks")


def to_markdown(report: dict) -> str:
    state = "complete" if report["complete"] else "**incomplete** (cut short: only the phases below were measured)"
    recipes = ", ".join(f"{k} {v}" for k, v in report["recipes"].items())
    lines = [f"# Peak CUDA memory per phase: {report['setting']}", "", f"{report['device']}, torch "
             f"{report['torch']}; `{report['command']}`; run {report['run_id']}, {report['rounds']} STE rounds.", "",
             f"Run {state}; recipes: {recipes}.", "",
             "| phase | calls | peak allocated GiB | allocated before GiB | allocated after GiB | seconds |",
             "|---|---|---|---|---|---|"]
    for name, p in report["phases"].items():
        lines.append(f"| {name} | {p['calls']} | {p['peak_gib']:.2f} | {p['allocated_before_gib']:.2f} | "
                     f"{p['allocated_after_gib']:.2f} | {p['seconds']:.1f} |")
    lines += ["", "Peak = torch.cuda.max_memory_allocated() during the phase (reset at its start); before/after: "
              "torch.cuda.memory_allocated() around its last call."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--rounds", type=int, default=4, help="STE rounds of the STEREO run")
    parser.add_argument("--attacks", action="store_true", help="also evaluate.py's white-box attacks")
    parser.add_argument("--run-id", default=os.environ.get("GPU_CHECK_RUN_ID", ""),
                        help="recorded in the results, so a comparison can refuse another run's file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_phase_memory.py measures CUDA memory and needs a GPU; none is visible")
    recipes = {"esd": "not started", "stereo": "not started"}
    if args.attacks:
        recipes["attacks"] = "not started"
    report = {"setting": "sd14-random, 512 px, trainer=gpu (batch 4, bf16, gradient checkpointing), DDIM 50",
              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "command": " ".join(["python", "tests/scripts/gpu_phase_memory.py", *(argv or sys.argv[1:])]),
              "run_id": args.run_id, "rounds": args.rounds, "attacks": list(ATTACKS) if args.attacks else [],
              "complete": False, "recipes": recipes, "phases": {}}
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        write_atomic(args.out / "gpu_phase_memory.json", json.dumps(report, indent=2))
        write_atomic(args.out / "gpu_phase_memory.md", to_markdown(report))

    memory = PhaseMemory(on_phase=save)
    report["phases"] = memory.phases  # the same dict: every save writes the phases measured so far
    save()
    build_sd14_random_once()
    instrument_recipes(memory)
    try:
        with tempfile.TemporaryDirectory() as runs:
            run_recipes(Path(runs), args.rounds, args.attacks, recipes, save)
    except BaseException as error:  # noqa: BLE001  (recorded, then raised again)
        for name, state in recipes.items():
            if state == "running":
                recipes[name] = f"failed: {type(error).__name__}: {str(error)[:200]}"
        save()
        raise
    report["complete"] = True
    save()
    print(to_markdown(report))


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename it: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
