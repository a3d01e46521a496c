"""The estimate as a table, findings against issue 11's figures, JSON for scripts/gpu_check.sh, and the
Markdown result file."""

from __future__ import annotations

import shlex
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import harness
from benchmarks.memory.configs import Setup
from benchmarks.memory.memtrace import GIB
from benchmarks.memory.phases import Phase
from stereo.manifest import write_json_atomic, write_text_atomic


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def table(phases: list[Phase]) -> str:
    rows = ["| phase | weights | grads | optimiser | DDP buckets | activations & temporaries | total peak | "
            "peak in | bar | met |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in phases:
        b = p.peak
        bar = f"≤ {p.bar_gib:g}" if p.bar_gib else ""
        met = "" if p.met is None else ("**met**" if p.met else "**NOT met**")
        rows.append(f"| {p.name} | {gib(b.weights)} | {gib(b.grads)} | {gib(b.optimizer)} | {gib(b.buckets)} | "
                    f"{gib(b.activations)} | **{gib(b.total)}** | {p.peak_section} | {bar} | {met} |")
    return "\n".join(rows)


ISSUE_ESTIMATES = [  # issue 11's figures for the code it describes, and the rows that reproduce them
    ("STE round 1 ≈ 25 GiB", "STE round 1 erase — before", "STE round 1 erase"),
    ("REO after 4 rounds ≈ 48 GiB", "REO after 4 rounds", "REO after 4 rounds"),
    ("multi-GPU ESD-u per GPU ≈ 20 GiB", "ESD-u, DDP — before", "ESD-u, 4-process DDP"),
]


def findings(phases: list[Phase]) -> str:
    def find(prefix: str, before: bool) -> Phase | None:
        return next((p for p in phases if p.name.startswith(prefix) and ("before" in p.name) == before), None)

    lines = []
    for claim, before_row, after_row in ISSUE_ESTIMATES:
        before, after = find(before_row, True), find(after_row, False)
        if before and after:
            lines.append(f"- {claim} (issue): before {gib(before.peak.total)} GiB ({before.name}); "
                         f"after {gib(after.peak.total)} GiB ({after.name})")
    return "\n".join(lines)


def sections_table(phases: list[Phase]) -> str:
    names = list(dict.fromkeys(k for p in phases for k in p.sections))
    rows = ["| phase | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for p in phases:
        cells = [gib(p.sections[k].total) if k in p.sections else "" for k in names]
        rows.append(f"| {p.name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def estimates_json(phases: list[Phase], setup: Setup) -> dict:
    """The machine-readable estimate (for scripts/gpu_check.sh): peak bytes per phase and their parts."""
    return {"setup": asdict(setup), "unit": "bytes (torch.cuda.max_memory_allocated semantics)",
            "phases": {p.name: p.as_dict() for p in phases}}


def write_results(phases: list[Phase], setup: Setup, out: Path, seconds: float, overrides: list[str] = ()) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    name = "sd14" if setup.model == "sd14-random" else setup.model
    tag = "".join(f"_{o.replace('=', '-').replace('.', '-').replace('/', '-')}" for o in overrides)
    stem = out / f"memory_{name}{tag}"
    command = shlex.join(["python", "-m", "benchmarks.memory", *sys.argv[1:]])
    info = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(seconds, 1), "machine": harness.machine(), **estimates_json(phases, setup)}
    write_json_atomic(stem.with_suffix(".json"), info)
    write_text_atomic(stem.with_suffix(".md"), markdown(phases, setup, info))
    return stem


def markdown(phases: list[Phase], setup: Setup, info: dict) -> str:
    m = info["machine"]
    bars = [p for p in phases if p.bar_gib]
    verdict = "\n".join(f"- {p.name}: {gib(p.peak.total)} GiB ≤ {p.bar_gib:g} GiB: "
                        f"{'met' if p.met else 'NOT met'}" for p in bars)
    title = f"Peak GPU memory per phase ({setup.model}, {setup.resolution} px, trainer=gpu), estimated on meta tensors"
    return f"""# {title}

`{info['command']}`

{info['date']}, {info['seconds']} s on {m['cpu']}; torch {m['torch']}, diffusers {m['diffusers']}, \
transformers {m['transformers']}, commit {m['git_commit']}

GiB = 2^30 bytes. "Peak" is what torch.cuda.max_memory_allocated reports (tensor storages in 512-byte
blocks); a real card also needs the CUDA context (~0.5 GiB) and the caching allocator's reserve.

## Bars (issue 11)

{verdict}

## The issue's estimates, before and after the fixes

{findings(phases)}

## Per phase

{table(phases)}

Columns are the parts at the phase's peak: weights (every resident module), grads and AdamW state
alive at that instant, DDP buckets, and the rest (activations saved for backward, temporaries,
autocast's bf16 copies of trainable weights). "peak in" names the part of the step where it occurs.

## Peak of each part of the step (GiB, everything resident included)

{sections_table([p for p in phases if _detailed(p, setup)])}
{_lora_notes(setup)}
## Settings (from the configs: model={setup.model} trainer=gpu method=stereo concept=nudity)

{_settings(setup)}

## How it is estimated

- The real modules (diffusers UNet2DConditionModel / AutoencoderKL, transformers CLIPTextModel from
  the model's configs) run forward and backward on meta tensors (shapes, no data); a TorchDispatchMode counts storage
  bytes as ops create them and as Python frees them. AdamW (fused and foreach kernels), gradient
  checkpointing (torch.utils.checkpoint, non-reentrant) and `noxattn`/`xattn` subsets are the real ones.
- CUDA behaviour is emulated: bf16 autocast with CUDA's op lists (group/layer norm, upsampling and
  losses in fp32; autocast's cache of bf16 casts of fp32 trainable weights, alive until the autocast
  region ends), and scaled-dot-product attention as a fused kernel (flash / memory-efficient: no
  L×L matrix; saves out + fp32 log-sum-exp). If a kernel falls back to the math path (e.g. the VAE's
  512-wide single-head attention), that phase needs more.
- One step of each loop is traced: the x_t chain keeps no state between DDIM steps, so one step's
  peak is the chain's. AdamW state is created before the traced step (steady state).
- Phases that differ only by tensors resident for the whole phase (an extra UNet, kept AdamW state,
  the gallery) add those bytes to the traced step: exact, since they are there at every instant.
- Not counted: the CUDA context, cuDNN/cuBLAS workspaces, the allocator's fragmentation (compare
  with torch.cuda.max_memory_reserved on a card), sample grids during training (`sample_every`),
  detectors / CLIP / Inception during evaluation.
"""


def _detailed(phase: Phase, setup: Setup) -> bool:
    """Rows of the per-part table: those with a bar or a "before", and with LoRA, ESD and the STE rounds 0-1."""
    lora = setup.lora_enabled and phase.name.startswith(("ESD-u, 1 GPU", "STE round 0", "STE round 1", "REO"))
    return bool(phase.bar_gib) or "before" in phase.name or lora


def _lora_notes(setup: Setup) -> str:
    if not setup.lora_enabled:
        return ""
    return f"""
## LoRA (method.lora.enabled=true, rank {setup.lora_rank}, `{setup.subset}`): what the real code keeps

- Every erasure (ESD, STE erase, REO): the pipeline (text encoder, VAE, its UNet in {setup.frozen_dtype}) + the
  fp32 student built by the real `make_student` (deepcopy + `.float()` + peft `add_adapter` on the subset's
  layers) + the adapter's grads and AdamW state. No teacher UNet: the teacher is the student with its adapter
  disabled, run with fp32 weights under autocast (`ErasureTrainer._teacher_eps`), traced as such.
- STE: each round ends with `frozen(student)` → `merged_unet`, which builds a NEW plain fp32 UNet while the
  student, every targeted layer's delta and merged weight are alive ("end: adapter folded in" rows, traced with
  the real function). The attack runs on that plain UNet, which has no gradient checkpointing. Rounds k >= 1
  keep round k-1's plain fp32 UNet (the STE loop's `unet`) beside the student copied from it.
- ESD and REO end with the export (merged_unet) and sample grids (`frozen_copy`: merge + a {setup.frozen_dtype}
  copy). Sample grids DURING training (`trainer.sample_every`) make the same merge with AdamW alive: not counted.
- Evaluation rows do not depend on LoRA (the evaluated model is the exported plain UNet).
- No "before" rows: they describe the accelerator / AdamW behaviour fixed in issue 11.
"""


def _settings(setup: Setup) -> str:
    s = setup
    return "\n".join([
        f"- frozen parts (text encoder, VAE, base UNet, teachers, erased UNets): {s.frozen_dtype}; "
        f"student UNet fp32 with `{s.subset}` trainable; bf16 autocast; gradient checkpointing "
        f"{s.gradient_checkpointing}; batch {s.batch} latents per process",
        (f"- method.lora.enabled: a rank-{s.lora_rank} adapter (fp32) on the `{s.subset}` layers of make_student's "
         "fp32 copy; the teacher is that student with its adapter disabled (fp32 weights, inside autocast); "
         "no teacher UNet" if s.lora_enabled else
         f"- teacher forward {'inside' if s.teacher_autocast else 'outside'} autocast (frozen in {s.frozen_dtype})"),
        f"- STEREO: {s.rounds} rounds, {s.concept_prompts} concept prompt(s), each round erases all found so far; "
        f"STE gallery {s.gallery_size} latents on the GPU; inversion batch {s.inversion_batch}; "
        f"REO {s.anchors_per_step} anchor(s) per step",
        f"- evaluation: concept inversion batch {s.eval_inversion_batch}, soft prompt batch "
        f"{s.eval_soft_prompt_batch}, UnlearnDiffAtk {s.uda_prompt_batch} prompts × {s.uda_prefix_tokens} "
        f"slots over the vocabulary, Ring-A-Bell population {s.rab_population} × {s.rab_prompt_batch} prompts, "
        f"generation batch {s.generation_batch} (CFG: {2 * s.generation_batch} latents)",
    ])
