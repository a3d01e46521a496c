#!/usr/bin/env bash
# The device check of issue 11, for a lent GPU: one GPU, no network, model=sd14-random (no download),
# at most 8 minutes in all. Run it whenever a session has a device, and commit its results files.
#
#   scripts/gpu_check.sh            # run every step
#   scripts/gpu_check.sh --dry-run  # print the steps and their time limits, run nothing (works on CPU)
#
# Steps, most important first (each has its own time limit, and no step starts after the overall
# budget is spent, so the whole stays within GPU_CHECK_BUDGET_S, default 470 s):
#   1. environment: the imports every step needs (pytest is only in the [dev] extra: without it the
#      two pytest steps are skipped, each with a message, and the others still run) and CUDA;
#   2. pytest_rehearsal: tests/test_gpu.py on SD 1.4's rehearsal pipeline (its PNDM scheduler as
#      published), trainer=gpu, fp16 AND bf16 frozen parts under CUDA autocast, ESD and STEREO;
#   3. pytest_sd14_512: sd14-random ESD-u at 512 px within its memory bar, the sample grid after the export;
#   3b. pytest_families: STEREO on tiny SDXL and SD 2.1 (v-prediction) folders with fp16 frozen parts under
#      CUDA autocast (tests/test_gpu.py; the CPU rehearsals can only run bf16);
#   4. phase_memory: torch.cuda.max_memory_allocated per phase of the real recipes (ESD-u, every round of
#      a 2-round STEREO run, REO, the white-box attacks, generation; tests/scripts/gpu_phase_memory.py,
#      which rewrites its results after every phase, so a timeout keeps what was measured);
#   5. memory_estimate: benchmarks.memory's traced estimate of the same phases, then both side by
#      side (only a measurement of THIS run, checked by its run id; unmeasured phases are listed);
#   6. speed_bf16_gc: ours (bf16, gradient checkpointing) against the reference loop: ESD erase step and
#      generation (each measurement loads its own pipeline, ~15 s for sd14-random);
#   7. speed_compile: our ESD erase step alone with torch.compile, one warm-up step (compilation) and one
#      timed step; last, so a timeout there costs no other result.
# Results: benchmarks/results/gpu_*.{md,json} (gpu_check.md/json = the summary); earlier gpu_* results
# are deleted first, so every file there is this run's. On exit (normal, failed, or killed) the summary
# is written and results and logs are copied to "$OUT" when OUT is set; without OUT the logs stay in
# the work folder printed at the end. A failing step is recorded and the next one still runs; the exit
# status is non-zero if any step failed, timed out or was skipped.
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
GPU_CHECK_RUN_ID="$(date -u +%Y%m%dT%H%M%SZ)-$$"
export GPU_CHECK_RUN_ID
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
LOGS="$WORK/logs"
START=$(date +%s)
SUMMARY="$WORK/steps.tsv"   # name, status, exit code, seconds, log
FAILED=0
mkdir -p "$LOGS"
: > "$SUMMARY"

# --- on exit, whatever happened: summary, copy to $OUT, and only then remove the work folder --------
write_summary() {
  python - "$SUMMARY" "$RESULTS" "$LOGS" "$(($(date +%s) - START))" "$GPU_CHECK_RUN_ID" <<'PY'
import json, sys
from pathlib import Path

summary, results, logs, total, run_id = (Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]),
                                         sys.argv[5])
steps = [dict(zip(("step", "status", "exit", "seconds", "log"), line.split("\t")))
         for line in summary.read_text().splitlines()]
tails = {}
for name in ("pytest_rehearsal", "pytest_sd14_512", "pytest_families"):
    log = logs / f"{name}.log"
    tails[name] = log.read_text(errors="replace").splitlines()[-15:] if log.is_file() else []
files = sorted(p.name for p in results.glob("gpu_*") if p.name not in ("gpu_check.md", "gpu_check.json"))
lines = ["# scripts/gpu_check.sh", "", f"Run {run_id}, total {total} s.", "", "| step | status | exit | seconds | log |",
         "|---|---|---|---|---|"]
lines += [f"| {s.get('step')} | {s.get('status')} | {s.get('exit')} | {s.get('seconds')} | {s.get('log')} |"
          for s in steps]
lines += ["", "Result files (all written by this run): " + (", ".join(files) or "none")]
for name, tail in tails.items():
    lines += ["", f"{name} (log tail):", "", "```", *tail, "```"]
(results / "gpu_check.md").write_text("\n".join(lines) + "\n")
(results / "gpu_check.json").write_text(json.dumps({"run_id": run_id, "total_s": total, "steps": steps,
                                                    "files": files, "pytest_tails": tails}, indent=2))
print("\n".join(lines))
PY
}

finish() {
  local status=$?
  set +e
  trap - EXIT INT TERM
  if ! $DRY_RUN; then
    ((status == 0)) || echo "gpu_check.sh: exiting with status $status" >> "$LOGS/gpu_check.log"
    write_summary || echo "gpu_check.sh: the summary failed; steps.tsv and the logs are copied as they are" >&2
    cp "$SUMMARY" "$LOGS/steps.tsv" 2>/dev/null
    if [[ -n "${OUT:-}" ]]; then
      mkdir -p "$OUT/logs" && cp "$RESULTS"/gpu_* "$OUT"/ 2>/dev/null
      if cp "$LOGS"/* "$OUT/logs/"; then
        echo "copied results and logs to $OUT"
      else
        echo "gpu_check.sh: copying the logs to $OUT failed; they stay in $LOGS" >&2
        exit "$((status ? status : 1))"
      fi
    else
      echo "OUT is not set: logs kept in $LOGS"
      exit "$status"
    fi
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap finish EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

if ! $DRY_RUN; then
  mkdir -p "$RESULTS"
  rm -f "$RESULTS"/gpu_*   # earlier runs' results: every gpu_* file left at the end is this run's
fi

record() {  # record NAME STATUS EXIT SECONDS LOG
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$SUMMARY"
}

# skip_step NAME LIMIT_S REASON: a step that cannot run here, recorded (and printed by the dry run).
skip_step() {
  if $DRY_RUN; then
    printf '%-16s limit %4ss  (skipped: %s)\n' "$1" "$2" "$3"
    return 0
  fi
  echo "== $1: skipped: $3"
  record "$1" "skipped: $3" - 0 -
  FAILED=1
}

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
    record "$name" "skipped (budget spent)" - 0 -
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
  record "$name" "$status" "$rc" "$took" "logs/$name.log"
  tail -n 3 "$LOGS/$name.log"
  sync_out
  return 0
}

# After every step, copy what exists so far to $OUT: even a kill that no trap sees keeps the finished steps.
sync_out() {
  [[ -n "${OUT:-}" ]] || return 0
  { mkdir -p "$OUT/logs" && cp "$SUMMARY" "$LOGS"/*.log "$OUT/logs/"; } 2>/dev/null || true
  cp "$RESULTS"/gpu_* "$OUT"/ 2>/dev/null || true   # (none yet after the first steps)
  return 0
}

# Exit 3: a module every step needs is missing or CUDA is not visible (the later steps are skipped);
# a missing pytest only writes $WORK/no_pytest (the pytest steps are skipped, the others run).
environment() {
  nvidia-smi || echo "nvidia-smi failed or is missing (not needed by the steps)"
  python - <<'PY'
import importlib, os, sys
from pathlib import Path

missing = []
for name in ("torch", "diffusers", "transformers", "accelerate", "safetensors", "hydra", "omegaconf", "stereo",
             "pytest"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", ""))
    except Exception as error:  # noqa: BLE001
        print(f"MISSING: {name} ({type(error).__name__}: {error})")
        missing.append(name)
for name in ("peft", "nudenet"):  # only some code paths (the evaluation's detector); a warning, not a stop
    try:
        importlib.import_module(name)
    except Exception as error:  # noqa: BLE001
        print(f"WARNING: {name} is missing ({type(error).__name__}: {error}); phase_memory's evaluation may fail")
if "pytest" in missing:
    Path(os.environ["WORK"], "no_pytest").touch()
    print("pytest is missing (only the [dev] extra has it: pip install -e '.[dev]'); the pytest steps are skipped")
    missing.remove("pytest")
if missing:
    print(f"missing modules every step needs: {', '.join(missing)}; the GPU steps are skipped")
    sys.exit(3)
import torch
if not torch.cuda.is_available():
    print("torch sees no CUDA device (torch.version.cuda = %s); the GPU steps are skipped" % torch.version.cuda)
    sys.exit(3)
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
PY
}

pytest_gpu() {
  python -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider --durations=0 -k "$1"
}

# benchmarks.memory's estimate (a meta-tensor trace on the CPU: seconds), beside the measurement
# of this run (gpu_memory_compare.py refuses a file with another run id, and lists unmeasured phases).
memory_estimate() {
  python -m benchmarks.memory --no-write --json "$WORK/memory_estimate.json"
  cp "$WORK/memory_estimate.json" "$RESULTS/gpu_memory_estimate.json"
  python tests/scripts/gpu_memory_compare.py "$RESULTS/gpu_phase_memory.json" "$WORK/memory_estimate.json" \
    --run-id "$GPU_CHECK_RUN_ID" --out "$RESULTS/gpu_memory_vs_estimate"
}

# Speed results are named speed_<model>_<device>.*; keep each setting's under its own gpu_ name.
speed() {
  local name="$1"
  shift
  python -m benchmarks.speed --model sd14-random --device cuda --precision bf16 --gc --steps 2 \
    --out "$WORK/$name" "$@"
  cp "$WORK/$name/speed_sd14-random_cuda.md" "$RESULTS/gpu_$name.md"
  cp "$WORK/$name/speed_sd14-random_cuda.json" "$RESULTS/gpu_$name.json"
}

# Our ESD erase step alone with torch.compile (benchmarks.speed's one-measurement mode: no reference loop, one
# pipeline load); the warm-up step compiles, one step is timed. Its reference: gpu_speed_bf16_gc.
speed_compile() {
  python -m benchmarks.speed --model sd14-random --device cuda --precision bf16 --gc --compile --steps 1 \
    --only esd:ours --result "$WORK/compile.json"
  python - "$WORK/compile.json" "$RESULTS/gpu_speed_bf16_gc_compile" "$GPU_CHECK_RUN_ID" <<'PY'
import json, sys
from pathlib import Path

result, stem = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
result |= {"run_id": sys.argv[3], "setting": "sd14-random ESD erase step, ours: bf16, gradient checkpointing, "
           "torch.compile; 1 warm-up step (compiles), 1 timed step"}
stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
stem.with_suffix(".md").write_text(
    f"# torch.compile: ESD erase step on sd14-random (run {sys.argv[3]})\n\n{result['setting']}.\n\n"
    f"{result['s_per_step']:.3f} s/step ({result['s_per_item']:.4f} s/latent), peak {result['peak_mb']:.0f} MB, "
    f"load {result['load_s']:.1f} s. Without compile: gpu_speed_bf16_gc.md.\n")
print(stem.with_suffix(".md").read_text())
PY
}

export WORK RESULTS
export -f environment pytest_gpu memory_estimate speed speed_compile

run_step environment 25 environment
ENV_RC=$(awk -F'\t' '$1 == "environment" {print $3}' "$SUMMARY")
if [[ "${ENV_RC:-}" == 3 ]]; then
  for step in pytest_rehearsal pytest_sd14_512 pytest_families phase_memory memory_estimate speed_bf16_gc \
      speed_compile; do
    skip_step "$step" 0 "the environment check failed (logs/environment.log)"
  done
  exit 1
fi
if [[ -e "$WORK/no_pytest" ]]; then
  skip_step pytest_rehearsal 60 "pytest is not installed (only in the [dev] extra: pip install -e '.[dev]')"
  skip_step pytest_sd14_512 60 "pytest is not installed (only in the [dev] extra: pip install -e '.[dev]')"
  skip_step pytest_families 45 "pytest is not installed (only in the [dev] extra: pip install -e '.[dev]')"
else
  run_step pytest_rehearsal 60 pytest_gpu half_frozen_parts
  run_step pytest_sd14_512 60 pytest_gpu sd14_random
  run_step pytest_families 45 pytest_gpu families
fi
run_step phase_memory 130 python tests/scripts/gpu_phase_memory.py --out "$RESULTS" --rounds 2 --attacks
run_step memory_estimate 40 memory_estimate
run_step speed_bf16_gc 60 speed speed_bf16_gc --phases esd,gen
run_step speed_compile 50 speed_compile
$DRY_RUN && exit 0
exit "$FAILED"
