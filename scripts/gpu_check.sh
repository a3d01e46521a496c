#!/usr/bin/env bash
# The device check of issue 11, for a lent GPU: one GPU, no network, model=sd14-random (no download),
# at most 8 minutes in all. Run it whenever a session has a device, and commit its results files.
#
#   scripts/gpu_check.sh            # run every step
#   scripts/gpu_check.sh --dry-run  # print the steps and their time limits, run nothing (works on CPU)
#
# Steps, most important first (each has its own time limit, and no step starts after the overall
# budget is spent, so the whole stays within GPU_CHECK_BUDGET_S, default 470 s):
#   1. pytest -m gpu: CUDA autocast with fp16 and bf16 frozen parts under trainer=gpu, sd14-random
#      ESD-u at 512 px within its memory bar, the sample grid after the export (tests/test_gpu.py);
#   2. torch.cuda.max_memory_allocated per phase of the real recipes (ESD-u, every round of a
#      4-round STEREO run, REO, the white-box attacks, generation; tests/scripts/gpu_phase_memory.py);
#   3. benchmarks/memory.py's traced estimate of the same phases, then both side by side;
#   4. the speed benchmark, ours (bf16, gradient checkpointing) against the reference loop: ESD erase
#      step and generation (each measurement loads its own pipeline, ~15 s for sd14-random);
#   5. the ESD erase step with torch.compile (compilation included in the step's time limit).
# Results: benchmarks/results/gpu_*.{md,json} (gpu_check.md/json = the summary), copied to "$OUT"
# (with the logs) when OUT is set. A failing step is recorded and the next one still runs; the
# exit status is non-zero if any step failed or timed out.
# shellcheck disable=SC2329  # the step functions run through run_step (timeout bash -c), unseen by shellcheck
set -euo pipefail

cd "$(dirname "$0")/.."
RESULTS=benchmarks/results
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"
DRY_RUN=false
case "${1:-}" in
  --dry-run) DRY_RUN=true ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
LOGS="$WORK/logs"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$LOGS" "$RESULTS"
START=$(date +%s)
SUMMARY="$WORK/steps.tsv"   # name, status, exit code, seconds, log
: > "$SUMMARY"
FAILED=0

# run_step NAME LIMIT_S COMMAND...: run COMMAND with a time limit cut to the budget left, log it, record it.
run_step() {
  local name="$1" limit="$2"
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - START) - 5))
  if ((left < limit)); then limit=$left; fi
  if $DRY_RUN; then
    printf '%-16s limit %4ss  %s\n' "$name" "$limit" "$*"
    return 0
  fi
  if ((left < 20)); then
    printf '%s\tskipped (budget spent)\t-\t0\t-\n' "$name" >> "$SUMMARY"
    FAILED=1
    return 0
  fi
  echo "== $name (limit ${limit}s): $*"
  local began rc=0
  began=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" bash -c 'set -euo pipefail; "$@"' "$name" "$@" \
    > "$LOGS/$name.log" 2>&1 || rc=$?
  local took=$(($(date +%s) - began)) status=ok
  if ((rc == 124 || rc == 137)); then status="timeout after ${limit}s"; elif ((rc != 0)); then status=failed; fi
  ((rc == 0)) || FAILED=1
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$took" "logs/$name.log" >> "$SUMMARY"
  tail -n 3 "$LOGS/$name.log"
}

# Speed results are named speed_<model>_<device>.*; keep each setting's under its own gpu_ name.
speed() {
  local name="$1"
  shift
  python benchmarks/speed.py --model sd14-random --device cuda --precision bf16 --gc --steps 2 \
    --out "$WORK/$name" "$@"
  cp "$WORK/$name/speed_sd14-random_cuda.md" "$RESULTS/gpu_$name.md"
  cp "$WORK/$name/speed_sd14-random_cuda.json" "$RESULTS/gpu_$name.json"
}

# benchmarks/memory.py's estimate (a meta-tensor trace on the CPU: seconds), beside the measurement.
memory_estimate() {
  python benchmarks/memory.py --no-write --json "$WORK/memory_estimate.json"
  python tests/scripts/gpu_memory_compare.py "$RESULTS/gpu_phase_memory.json" "$WORK/memory_estimate.json" \
    --out "$RESULTS/gpu_memory_vs_estimate"
}

environment() {
  nvidia-smi
  python -c 'import torch, diffusers, transformers, accelerate
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
print("diffusers", diffusers.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__)
assert torch.cuda.is_available(), "no CUDA device visible"'
}

export WORK RESULTS
export -f environment memory_estimate speed
run_step environment 15 environment
run_step pytest_gpu 120 python -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider --durations=0
run_step phase_memory 125 python tests/scripts/gpu_phase_memory.py --out "$RESULTS" --rounds 4 --attacks
run_step memory_estimate 50 memory_estimate
run_step speed_bf16_gc 70 speed speed_bf16_gc --phases esd,gen
run_step speed_compile 90 speed speed_bf16_gc_compile --phases esd --compile
$DRY_RUN && exit 0

# --- summary --------------------------------------------------------------------------------------
python - "$SUMMARY" "$RESULTS" "$LOGS" "$(($(date +%s) - START))" <<'PY'
import json, sys
from pathlib import Path

summary, results, logs, total = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
steps = [dict(zip(("step", "status", "exit", "seconds", "log"), line.split("\t")))
         for line in summary.read_text().splitlines()]
pytest_log = logs / "pytest_gpu.log"
pytest_tail = pytest_log.read_text().splitlines()[-15:] if pytest_log.is_file() else []
files = sorted(p.name for p in results.glob("gpu_*") if p.name not in ("gpu_check.md", "gpu_check.json"))
lines = ["# scripts/gpu_check.sh", "", f"Total {total} s.", "", "| step | status | exit | seconds | log |",
         "|---|---|---|---|---|"]
lines += [f"| {s['step']} | {s['status']} | {s['exit']} | {s['seconds']} | {s['log']} |" for s in steps]
lines += ["", "Result files: " + ", ".join(files), "", "pytest -m gpu (tail):", "", "```", *pytest_tail, "```"]
(results / "gpu_check.md").write_text("\n".join(lines) + "\n")
(results / "gpu_check.json").write_text(json.dumps({"total_s": total, "steps": steps, "files": files,
                                                    "pytest_tail": pytest_tail}, indent=2))
print("\n".join(lines))
PY

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT/logs"
  cp "$RESULTS"/gpu_* "$OUT"/
  cp "$LOGS"/*.log "$OUT/logs/"
  echo "copied results and logs to $OUT"
fi
exit "$FAILED"
