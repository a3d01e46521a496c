"""The registry of measurements: for each phase, its reference loop and ours; and one measurement."""

from __future__ import annotations

import time
from functools import partial

import torch

from benchmarks import harness
from benchmarks.speed.ours import ours_erase, ours_generation, ours_ti
from benchmarks.speed.reference import reference_erase, reference_generation, reference_ti
from benchmarks.speed.workload import Settings, Workload

PHASES = ("esd", "reo", "ti", "gen", "scale")
DEFAULT_PHASES = ("esd", "reo", "ti", "gen")
RUNS = {
    "esd": {"ref": partial(reference_erase, reo=False), "ours": partial(ours_erase, reo=False)},
    "reo": {"ref": partial(reference_erase, reo=True), "ours": partial(ours_erase, reo=True)},
    "ti": {"ref": reference_ti, "ours": ours_ti},
    "gen": {"ref": reference_generation, "ours": ours_generation},
    "scale": {"ours": partial(ours_erase, reo=False)},  # on N processes (isolation.measure_scaling)
}
TITLES = {"esd": "ESD erase step (STE)", "reo": "REO step (2 negatives, anchors)", "ti": "concept inversion step",
          "gen": "generation"}


def measure(phase: str, impl: str, s: Settings) -> dict:
    """Load a fresh pipeline, then time `impl` ("ref" | "ours") of `phase` and read its memory."""
    dtype = "bf16" if impl == "ours" and s.precision == "bf16" else "fp32"
    began = time.perf_counter()
    pipe = harness.load(s.model, dtype, s.device)
    load_s = time.perf_counter() - began
    work = Workload.build(pipe, harness.model_config(s.model).resolution)
    loaded = harness.current_mb(s.device)
    harness.reset_peak(s.device)
    timing = RUNS[phase][impl](pipe, work, s)
    return {"s_per_step": timing.s_per_step, "items_per_step": timing.items_per_step,
            "s_per_item": timing.s_per_step / timing.items_per_step, "peak_mb": harness.peak_mb(s.device),
            "loaded_mb": loaded, "load_s": load_s, "torch_threads": torch.get_num_threads(),
            "attention": sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})}
