"""The speed report: the command that made it, and its Markdown (machine, settings, phases, scaling)."""

from __future__ import annotations

import os
import shlex

from benchmarks.speed.cases import TITLES


def command_line(argv: list[str]) -> str:
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
    return prefix + shlex.join(["python", "-m", "benchmarks.speed", *argv])


def memory_note(device_type: str, isolate: bool) -> str:
    """What the memory columns mean on this device."""
    memory = ("torch's peak allocated CUDA memory, reset before each measurement; loaded = allocated after "
              "loading the pipeline" if device_type == "cuda" else
              "peak RSS of the measuring process; loaded = its RSS right after loading the pipeline")
    if device_type == "cpu" and not isolate:
        memory += " (--no-isolate: one process, so the peak is the peak so far)"
    return memory


def to_markdown(report: dict) -> str:
    m, st = report["machine"], report["settings"]
    gpu = m["gpu"]
    lines = [
        f"# Speed and memory: ours vs the reference loop ({st['model']}, {st['device']})",
        "",
        f"`{report['command']}`  ",
        f"{report['created']}, commit {m['git_commit']}",
        "",
        "## Machine",
        "",
        f"- {m['platform']}, Python {m['python']}",
        f"- CPU: {m['cpu']}, {m['cpu_count']} logical cores ({m['usable_cores']} usable), "
        f"{m['torch_threads']} torch threads (OMP_NUM_THREADS={m['omp_num_threads']})",
        f"- GPU: {gpu['name']}, {gpu['memory_mb']} MiB, CUDA {gpu['cuda']}" if gpu else "- GPU: none",
        f"- torch {m['torch']}, diffusers {m['diffusers']}, transformers {m['transformers']}, "
        f"accelerate {m['accelerate']}",
        "",
        "## Settings",
        "",
        "- reference: fp32, batch 1, one UNet call per prompt, a new pipeline per measurement",
        f"- ours: batch {st['batch']}, precision {st['precision']}, gradient checkpointing {st['gc']}, "
        f"torch.compile {st['compile']}, attention {', '.join(st['attention'])}",
        f"- x_t from DDIM {st['ddim_steps']} steps (CFG 3) stopped at i ~ U[1, {st['ddim_steps'] - 1}); "
        f"generation {st['gen_steps']} steps; {st['steps']} timed steps after one warm-up step",
        f"- memory: {st['memory']}",
    ]
    if report["phases"]:
        lines += ["", "## Phases", "",
                  "| phase | ref s/item | ours s/item | speed-up | ref s/step | ours s/step (items) "
                  "| ref peak MiB | ours peak MiB | ref peak − loaded | ours peak − loaded |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in report["phases"]:
            ref, ours = row["reference"], row["ours"]
            lines.append(
                f"| {TITLES[row['phase']]} | {ref['s_per_item']:.4f} | {ours['s_per_item']:.4f} | "
                f"{row['speed_up']:.2f}× | {ref['s_per_step']:.4f} | {ours['s_per_step']:.4f} "
                f"({ours['items_per_step']}) | {ref['peak_mb']:.0f} | {ours['peak_mb']:.0f} | "
                f"{ref['peak_mb'] - ref['loaded_mb']:.0f} | {ours['peak_mb'] - ours['loaded_mb']:.0f} |")
        lines += ["", "Items: latents (erase, inversion) or images (generation); speed-up = ref s/item ÷ ours "
                  "s/item. A step of ours handles `items` latents or images, one of the reference loop one."]
    if report["scaling"]:
        first = report["scaling"][0]["processes"]
        lines += ["", "## Scaling: ESD erase, our trainer on N processes", "",
                  f"Data parallel, batch {st['batch']} per process; threads per process = "
                  f"max(1, {st['cores']} cores // N).", "",
                  f"| processes | threads/process | latents/s | vs {first} | efficiency | peak MiB/process |",
                  "|---|---|---|---|---|---|"]
        for row in report["scaling"]:
            lines.append(f"| {row['processes']} | {row['threads_per_process']} | {row['latents_per_s']:.3f} | "
                         f"{row['vs_first']:.2f}× | {row['efficiency']:.0%} | {row['peak_mb']:.0f} |")
    return "\n".join(lines) + "\n"
