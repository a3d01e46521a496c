"""Speed and memory of every STEREO phase: ours vs a plain reference loop, in the same run.

Phases: `esd` (an STE erase step), `reo` (a REO step), `ti` (a concept-inversion step), `gen`
(evaluation image generation), and, opt-in, `scale` (ESD-erase throughput of our trainer on 1..N
data-parallel processes, `--procs`).

The reference loops are what research code does: fp32, one latent/image at a time, one UNet call
per prompt, a new pipeline per stage; textual inversion trains the whole token table and restores
the old rows after each step. Ours: batched CFG while sampling x_t, all teacher predictions in
one forward, B latents per step, optional bf16 (autocast, frozen parts in bf16), gradient
checkpointing and torch.compile; inversion trains only the new vectors; batched generation.
Throughput is compared per latent (or image) as a ratio.

Every (phase, implementation) loads its own pipeline. On CPU each also runs in a process of its
own (`--isolate`, the default there), because a process's peak RSS cannot be reset: the peak
reported is then that process's, next to its RSS right after loading the pipeline. On GPU the
peak is torch's allocated memory, reset before each measurement. Results go to
`--out/speed_<model>_<device>.{md,json}` with the command line and the machine.

  python -m benchmarks.speed --model tiny --phases esd,reo,ti,gen,scale --procs 1,2      # CPU
  python -m benchmarks.speed --model sd14-random --batch 4 --precision bf16 --gc         # GPU
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.speed.cases import DEFAULT_PHASES, PHASES, measure
from benchmarks.speed.isolation import measure_pair, measure_scaling
from benchmarks.speed.report import command_line, memory_note, to_markdown
from benchmarks.speed.workload import Settings
from stereo.manifest import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parents[1] / "results"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "toy", "sd14-random"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--phases", default=",".join(DEFAULT_PHASES), help=f"comma list of {', '.join(PHASES)}")
    parser.add_argument("--steps", type=int, default=4, help="timed steps, after one warm-up step")
    parser.add_argument("--batch", type=int, default=4, help="ours: latents per step (and process)")
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--gen-steps", type=int, default=25)
    parser.add_argument("--precision", default="no", choices=["no", "bf16"], help="ours (the reference is fp32)")
    parser.add_argument("--gc", action="store_true", help="ours: gradient checkpointing")
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile the UNet that trains/samples")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="each measurement in its own process (default: on CPU only)")
    parser.add_argument("--procs", default="1,2", help="process counts of the `scale` phase")
    parser.add_argument("--cores", type=int, default=harness.usable_cores(),
                        help="cores shared by the `scale` processes (default: this process's usable cores)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the result files")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # PHASE:IMPL, one measurement (child process)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)  # where --only writes its result
    args = parser.parse_args(argv)
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    # under torchrun each process takes the GPU of its local rank
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    return Settings(model=args.model, device=device, steps=args.steps, batch=args.batch, ddim_steps=args.ddim_steps,
                    gen_steps=args.gen_steps, precision=args.precision, gc=args.gc, compile=args.compile)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    s = settings_from(args)
    if args.only:  # a child: one measurement, result to a file (rank 0 under torchrun)
        phase, impl = args.only.split(":")
        result = measure(phase, impl, s)
        if int(os.environ.get("RANK", 0)) == 0:
            write_json_atomic(args.result, result)
        return

    phases = args.phases.split(",")
    isolate = s.device.type == "cpu" if args.isolate is None else args.isolate
    rows = []
    for phase in (p for p in phases if p != "scale"):
        rows.append(measure_pair(phase, s, argv, isolate))
        print(f"{phase}: ref {rows[-1]['reference']['s_per_item']:.4f} s/item, "
              f"ours {rows[-1]['ours']['s_per_item']:.4f} s/item, {rows[-1]['speed_up']:.2f}x", flush=True)
    procs = [int(n) for n in args.procs.split(",")]
    scaling = measure_scaling(s, argv, procs, args.cores) if "scale" in phases else []
    ours = rows[0]["ours"] if rows else scaling[0]
    report = {
        "command": command_line(argv),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": harness.machine(),
        "settings": {"model": s.model, "device": s.device.type, "isolate": isolate, "steps": s.steps,
                     "batch": s.batch, "ddim_steps": s.ddim_steps, "gen_steps": s.gen_steps,
                     "precision": s.precision, "gc": s.gc, "compile": s.compile, "attention": ours["attention"],
                     "cores": args.cores, "memory": memory_note(s.device.type, isolate)},
        "phases": rows,
        "scaling": scaling,
    }
    markdown = to_markdown(report)
    print(markdown)
    stem = args.out / f"speed_{s.model}_{s.device.type}"
    write_text_atomic(stem.with_suffix(".md"), markdown)
    write_json_atomic(stem.with_suffix(".json"), report)
    print(f"wrote {stem}.md and {stem}.json")
