"""Measured peak CUDA memory per phase beside benchmarks.memory's estimate (run by scripts/gpu_check.sh).

    python tests/scripts/gpu_memory_compare.py MEASURED.json ESTIMATE.json --out STEM [--run-id ID]

MEASURED: gpu_phase_memory.py's result (phase label -> peak_gib). ESTIMATE: `python -m benchmarks.memory
--json PATH` (phase name -> peak_gib, bar_gib). Each measured phase is paired with the estimate of
the same phase after the fixes (not the "— before" rows); the estimate rows that the measured run
planned (its STE rounds, REO, its attacks, generation) but did not measure are listed as missing
(a run cut short by its time limit). With --run-id (default $GPU_CHECK_RUN_ID), a MEASURED file
written by another run is refused: an old measurement is never compared as if it were new.
Writes <out>.md and <out>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

ATTACKS = {"concept_inversion": "concept inversion", "soft_prompt": "soft prompt", "unlearndiffatk": "UnlearnDiffAtk",
           "ring_a_bell": "Ring-A-Bell"}  # evaluate.py's attack names -> benchmarks.memory's row names


def estimate_name(label: str, names: list[str]) -> str | None:
    """The estimate row for a measured phase label (gpu_phase_memory.py's labels), or None."""
    after = [n for n in names if "before" not in n]
    if label.startswith("attack: "):
        return next((n for n in after if n == f"evaluation attack: {ATTACKS.get(label[8:], label[8:])}"), None)
    patterns = [
        (r"train: erase$", r"ESD-u, 1 GPU$"),
        (r"train: ste(\d+) erase$", r"STE round {0} erase$"),
        (r"inversion: <.*-ste(\d+)>$", r"STE round {0} attack"),
        (r"train: reo$", r"REO after"),
        (r"(samples|generation): ", r"evaluation: generation$"),
    ]
    for measured, estimated in patterns:
        match = re.match(measured, label)
        if match:
            wanted = re.compile(estimated.format(*match.groups()))
            return next((n for n in after if wanted.match(n)), None)
    return None


def planned_rows(measured: dict, names: list[str]) -> list[str]:
    """The estimate rows (after the fixes) of every phase the measured run set out to measure."""
    after = [n for n in names if "before" not in n]
    wanted = [r"ESD-u, 1 GPU$"]
    for k in range(measured.get("rounds", 0)):
        wanted += [rf"STE round {k} erase$", rf"STE round {k} attack"]
    wanted.append(r"REO after")
    wanted += [rf"evaluation attack: {re.escape(ATTACKS.get(a, a))}$" for a in measured.get("attacks", [])]
    wanted.append(r"evaluation: generation$")
    rows = [next((n for n in after if re.match(pattern, n)), None) for pattern in wanted]
    return [n for n in rows if n]


def missing_rows(measured: dict, estimate: dict) -> list[str]:
    names = list(estimate["phases"])
    paired = {estimate_name(label, names) for label in measured["phases"]}
    return [n for n in planned_rows(measured, names) if n not in paired]


def compare(measured: dict, estimate: dict) -> list[dict]:
    names = list(estimate["phases"])
    rows = []
    for label, phase in measured["phases"].items():
        name = estimate_name(label, names)
        est = estimate["phases"][name] if name else None
        peak = phase["peak_gib"]
        rows.append({"phase": label, "measured_gib": peak, "estimate": name,
                     "estimate_gib": est["peak_gib"] if est else None,
                     "ratio": peak / est["peak_gib"] if est and est["peak_gib"] else None,
                     "bar_gib": est.get("bar_gib") if est else None,
                     "within_bar": (peak <= est["bar_gib"]) if est and est.get("bar_gib") else None})
    return rows


def to_markdown(rows: list[dict], measured: dict, missing: list[str]) -> str:
    fmt = lambda v, spec=".2f": "–" if v is None else format(v, spec)  # noqa: E731
    lines = [f"# Peak CUDA memory: measured vs estimated ({measured['setting']})", "",
             f"Measured on {measured['device']}, torch {measured['torch']} (`{measured['command']}`); estimate: "
             "benchmarks.memory (meta-tensor trace, no CUDA context). GiB = 2^30 bytes.", "",
             "| phase (measured) | measured GiB | estimate row | estimate GiB | measured / estimate | bar GiB "
             "| within bar |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        within = "–" if r["within_bar"] is None else ("yes" if r["within_bar"] else "**no**")
        lines.append(f"| {r['phase']} | {fmt(r['measured_gib'])} | {r['estimate'] or '–'} | "
                     f"{fmt(r['estimate_gib'])} | {fmt(r['ratio'])} | {fmt(r['bar_gib'], 'g')} | {within} |")
    rounds = measured.get("rounds")
    lines += ["", f"Measured run: {rounds} STE rounds (the estimate's REO row assumes its own round count, "
              "so REO's negatives differ when they differ); "
              + ("complete." if measured.get("complete") else "**incomplete** (cut short by its time limit).")]
    if missing:
        lines += ["", "Not measured (planned, but the run did not reach them): " + "; ".join(missing) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("measured", type=Path)
    parser.add_argument("estimate", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="output stem: <out>.md and <out>.json")
    parser.add_argument("--run-id", default=os.environ.get("GPU_CHECK_RUN_ID", ""),
                        help="refuse a MEASURED file whose run_id differs (empty: accept any)")
    args = parser.parse_args(argv)
    if not args.measured.is_file():
        raise SystemExit(f"{args.measured} is missing: gpu_phase_memory.py measured nothing in this run "
                         "(see its log: it failed or timed out before its first phase)")
    measured = json.loads(args.measured.read_text())
    if args.run_id and measured.get("run_id") != args.run_id:
        raise SystemExit(f"{args.measured} was written by run {measured.get('run_id')!r}, not by this run "
                         f"({args.run_id!r}); refusing to compare an old measurement")
    estimate = json.loads(args.estimate.read_text())
    rows, missing = compare(measured, estimate), missing_rows(measured, estimate)
    args.out.with_suffix(".json").write_text(json.dumps({
        "measured": str(args.measured), "run_id": measured.get("run_id"), "complete": measured.get("complete"),
        "rounds": measured.get("rounds"), "rows": rows, "missing": missing}, indent=2))
    markdown = to_markdown(rows, measured, missing)
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
