"""What the benchmark scripts share: loading a base model, device sync and memory probes, a
description of the machine they ran on, and writing result files atomically."""

from __future__ import annotations

import os
import platform
import resource
import sys
import time

import torch


def model_config(kind: str, dtype: str = "fp32"):
    """The `model` node of the real config (`conf/model/<kind>.yaml`) with its dtype set."""
    from stereo.config import compose

    return compose([f"model={kind}", f"model.dtype={dtype}"]).model


def load(kind: str, dtype: str, device: torch.device | str):
    """A fresh base pipeline of `kind` (frozen parts in `dtype`) on `device`."""
    from stereo.models.loading import load_pipeline

    return load_pipeline(model_config(kind, dtype)).to(device)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device | str, repeats: int = 1, warm_up: bool = True) -> float:
    """Mean seconds of `fn()` over `repeats` calls, after one untimed call when `warm_up`."""
    if warm_up:
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


# -- memory ------------------------------------------------------------------------------------
# GPU: bytes allocated by torch. CPU: the process's resident set (RSS); its peak can only be reset
# by starting a new process, which is why benchmarks.speed measures each phase in its own process on CPU.
def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def current_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        with open("/proc/self/statm") as handle:  # pages: size, resident, ...
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # no procfs (macOS): the peak so far is the closest we can read
        return peak_mb(device)


# -- provenance --------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine() -> dict:
    """What a benchmark figure depends on besides the code: CPU, GPU, threads, library versions."""
    from stereo.manifest import git_commit, package_versions

    versions = package_versions()
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "diffusers": versions["diffusers"],
        "transformers": versions["transformers"],
        "accelerate": versions["accelerate"],
        "git_commit": git_commit(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "memory_mb": round(props.total_memory / 2**20),
                       "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    return info
