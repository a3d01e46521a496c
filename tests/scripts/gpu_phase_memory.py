"""Peak CUDA memory of every phase of the real recipes on SD 1.4's architecture (run by scripts/gpu_check.sh).

    python tests/scripts/gpu_phase_memory.py --out benchmarks/results [--rounds 4] [--attacks]

Runs, on `model=sd14-random` (SD 1.4's configs, random weights: no download) at 512 px with
trainer=gpu exactly as users run it (batch 4, bf16 autocast, gradient checkpointing, DDIM 50 x_t
chains) and CPU-free step counts: ESD-u (`method=esd concept=nudity`), then STEREO with `--rounds`
STE rounds and REO, then (with `--attacks`) evaluate.py's white-box attacks on the base model.
Each phase is one call of a recipe function, wrapped where the recipes call it; the wrapper resets
torch's peak counter before the phase and reads `torch.cuda.max_memory_allocated()` after it, and
also records what stays allocated after the phase (a growing value across STE rounds means a
round's model or optimiser was not released). Writes gpu_phase_memory.{json,md} into --out.
"""

from __future__ import annotations

import argparse
import functools
import json
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


class PhaseMemory:
    """Peak and retained CUDA memory per named phase; nested phases count toward the outermost one."""

    def __init__(self):
        self.phases: dict[str, dict] = {}
        self.depth = 0

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
    import stereo.evaluation.runner as runner
    import stereo.generation as generation
    import stereo.train  # noqa: F401  (imports every recipe module, so their references get wrapped)
    from stereo.erasure.session import Session
    from stereo.erasure.trainer import ErasureTrainer

    memory.instrument(ErasureTrainer, "run", lambda self: f"train: {self.settings.desc}")
    memory.instrument(inversion, "learn_token", lambda *a, **k: f"inversion: {k.get('token') or a[2]}")
    memory.instrument(gallery, "concept_gallery", lambda *a, **k: "generation: concept gallery")
    memory.instrument(Session, "export", lambda self, *a, **k: "export")
    memory.instrument(Session, "save_samples", lambda self, unet, prompts, name, *a, **k: f"samples: {name}")
    memory.instrument(generation, "generate", lambda *a, **k: "generation: other")
    memory.instrument(runner.Evaluation, "run_cell", lambda self, cell, *a, **k: f"attack: {cell.attack}")


def run_recipes(out: Path, rounds: int, attacks: bool) -> None:
    from stereo.config import compose
    from stereo.train import train

    train(compose([*SD14, "method=esd", "trainer.steps=2", f"output_dir={out / 'esd'}"]))
    train(compose([*SD14, "method=stereo", f"method.ste.rounds={rounds}", "method.ste.erase_steps=2",
                   "method.ste.gallery_size=4", "method.ste.gallery_steps=10", "method.ste.inversion.steps=2",
                   "method.reo.steps=2", f"output_dir={out / 'stereo'}"]))
    if attacks:
        from stereo.evaluation.config import compose_eval
        from stereo.evaluation.runner import evaluate

        small = ["steps=2", "gallery_size=2", "gallery_steps=10"]
        evaluate(compose_eval([
            "concept=nudity", "model@base=sd14-random", "base.resolution=512",
            "attack=[concept_inversion,soft_prompt,unlearndiffatk]", "generation.steps=10",
            "generation.max_prompts=2", "progress=false", "attacks.unlearndiffatk.project_every=1",
            *[f"attacks.{a}.{s}" for a in ("concept_inversion", "soft_prompt", "unlearndiffatk") for s in small],
            f"output_dir={out / 'eval'}"]))


def to_markdown(report: dict) -> str:
    lines = [f"# Peak CUDA memory per phase: {report['setting']}", "", f"{report['device']}, torch "
             f"{report['torch']}; `{report['command']}`", "",
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
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_phase_memory.py measures CUDA memory and needs a GPU; none is visible")
    memory = PhaseMemory()
    instrument_recipes(memory)
    with tempfile.TemporaryDirectory() as runs:
        run_recipes(Path(runs), args.rounds, args.attacks)
    report = {"setting": "sd14-random, 512 px, trainer=gpu (batch 4, bf16, gradient checkpointing), DDIM 50",
              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "command": " ".join(["python", "tests/scripts/gpu_phase_memory.py", *(argv or sys.argv[1:])]),
              "phases": memory.phases}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_phase_memory.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu_phase_memory.md").write_text(to_markdown(report))
    print(to_markdown(report))


if __name__ == "__main__":
    main()
