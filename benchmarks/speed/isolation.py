"""Measurements in processes of their own: a pair (reference, ours) each in a fresh process (on CPU a
process's peak RSS cannot be reset), and our trainer's throughput on N data-parallel processes (torchrun)."""

from __future__ import annotations

import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.speed.cases import measure
from benchmarks.speed.workload import Settings

ROOT = Path(__file__).resolve().parents[2]
MODULE = "benchmarks.speed"  # what a child runs (`python -m benchmarks.speed ... --only PHASE:IMPL`)


def child_env(**extra: str) -> dict:
    """This process's environment, with the repository root importable (the child runs `-m benchmarks.speed`)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_child(command: list[str], env: dict | None = None) -> dict:
    """Run a `--only` measurement in new process(es); rank 0 writes its result to a file."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        proc = subprocess.run([*command, "--result", str(result)], env=env or child_env(), capture_output=True,
                              text=True)
        if proc.returncode != 0 or not result.is_file():
            raise RuntimeError(f"{shlex.join(command)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text())


def measure_pair(phase: str, s: Settings, argv: list[str], isolate: bool) -> dict:
    results = {}
    for impl in ("ref", "ours"):
        if isolate:
            results[impl] = run_child([sys.executable, "-m", MODULE, *argv, "--only", f"{phase}:{impl}"])
        else:
            results[impl] = measure(phase, impl, s)
            torch.compiler.reset()  # compiled graphs hold on to the module they were traced from
            gc.collect()
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
    return {"phase": phase, "reference": results["ref"], "ours": results["ours"],
            "speed_up": results["ref"]["s_per_item"] / results["ours"]["s_per_item"]}


def measure_scaling(s: Settings, argv: list[str], procs: list[int], cores: int) -> list[dict]:
    """ESD-erase latents/s of our trainer on N data-parallel processes (torchrun; gloo on CPU)."""
    if s.device.type == "cuda" and max(procs) > torch.cuda.device_count():
        raise ValueError(f"--procs {procs} needs {max(procs)} GPUs, this machine has {torch.cuda.device_count()}; "
                         "lower --procs or measure scaling on CPU with --device cpu")
    rows = []
    for n in procs:
        threads = max(1, cores // n)
        env = child_env(OMP_NUM_THREADS=str(threads))
        if s.device.type == "cpu":
            env["ACCELERATE_USE_CPU"] = "true"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                   "-m", MODULE, *argv, "--only", "scale:ours"]
        result = run_child(command, env)
        rows.append({"processes": n, "threads_per_process": threads,
                     "latents_per_s": result["items_per_step"] / result["s_per_step"], **result})
    for row in rows:
        row["vs_first"] = row["latents_per_s"] / rows[0]["latents_per_s"]
        row["efficiency"] = row["vs_first"] * rows[0]["processes"] / row["processes"]
    return rows
