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

  python benchmarks/speed.py --model tiny --phases esd,reo,ti,gen,scale --procs 1,2      # CPU
  python benchmarks/speed.py --model sd14-random --batch 4 --precision bf16 --gc         # GPU
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import NamedTuple

import harness
import torch
from accelerate import Accelerator

from stereo.attacks.inversion import InversionSettings, learn_token
from stereo.erasure.sampling import ddim_scheduler, draw_stop_steps
from stereo.erasure.subsets import select_trainable
from stereo.erasure.trainer import ErasureTrainer, ESDObjective, REOObjective, TrainerSettings
from stereo.generation import generate
from stereo.manifest import write_json_atomic, write_text_atomic
from stereo.objectives import esd_target, reo_target

SCRIPT = Path(__file__).resolve()
PHASES = ("esd", "reo", "ti", "gen", "scale")
DEFAULT_PHASES = ("esd", "reo", "ti", "gen")
PROMPTS = ["church", "", "a church on a hill", "a church in the snow", "a chapel by a lake", "a church at night"]


@dataclass
class Settings:
    model: str
    device: torch.device
    steps: int  # timed steps, after one warm-up step
    batch: int  # ours: latents per step and process
    ddim_steps: int
    gen_steps: int
    precision: str  # ours: no | bf16 (the reference is always fp32)
    gc: bool  # ours: gradient checkpointing
    compile: bool  # ours: torch.compile the UNet that runs forward and backward


class Timing(NamedTuple):
    s_per_step: float
    items_per_step: int  # latents (esd, reo, ti, scale: over all processes) or images (gen)


@dataclass
class Workload:
    """The inputs of every phase, from the measuring process's own pipeline."""

    conds: dict[str, torch.Tensor]  # negatives (2, L, D), uncond (1, L, D), anchors (2, L, D)
    latents: torch.Tensor  # (4, 4, h, w) stand-ins for the concept gallery (inversion)
    prompts: list[str]  # evaluation prompts (generation)
    latent_size: int

    @classmethod
    def build(cls, pipe, resolution: int) -> "Workload":
        device = pipe.unet.device
        latent = resolution // pipe.vae_scale_factor
        ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            emb = pipe.text_encoder(ids.to(device))[0].float()
        latents = torch.randn(4, 4, latent, latent, generator=torch.Generator().manual_seed(0)).to(device)
        return cls(conds={"negatives": emb[[0, 4]], "uncond": emb[1:2], "anchors": emb[2:4]}, latents=latents,
                   prompts=[p for p in PROMPTS if p] * 2, latent_size=latent)


def maybe_compile(unet, s: Settings):
    return torch.compile(unet) if s.compile else unet


# -- reference loops ---------------------------------------------------------------------------
def reference_erase_step(scheduler, teacher, student, opt, conds, ddim_steps, latent, gen, reo):
    """One step of the reference scripts: batch 1, a UNet call per prompt everywhere."""
    negative, anchor = conds["negatives"][:1], conds["anchors"][:1]
    scheduler = ddim_scheduler(scheduler)  # the x_t chain is DDIM whatever the model ships (SD 1.4: PNDM)
    scheduler.set_timesteps(ddim_steps)
    stop = int(draw_stop_steps(1, ddim_steps, gen)[0])
    x = torch.randn((1, 4, latent, latent), generator=gen).to(negative.device)
    with torch.no_grad():
        for k in range(stop):
            t = scheduler.timesteps[k]
            e_u = student(x, t, encoder_hidden_states=conds["uncond"]).sample
            e_c = student(x, t, encoder_hidden_states=negative).sample
            x = scheduler.step(e_u + 3.0 * (e_c - e_u), t, x).prev_sample
        t = scheduler.timesteps[stop]
        e_u = teacher(x, t, encoder_hidden_states=conds["uncond"]).sample
        if reo:
            e_a = teacher(x, t, encoder_hidden_states=anchor).sample[None]
            e_n = torch.stack([teacher(x, t, encoder_hidden_states=n[None]).sample for n in conds["negatives"]])
            target = reo_target(e_u, e_a, e_n, 1.0, 3.0)
        else:
            target = esd_target(e_u, teacher(x, t, encoder_hidden_states=negative).sample, 1.0)
    loss = torch.nn.functional.mse_loss(student(x, t, encoder_hidden_states=negative).sample, target)
    loss.backward()
    opt.step()
    opt.zero_grad()


def reference_erase(pipe, work: Workload, s: Settings, reo: bool) -> Timing:
    teacher = pipe.unet.requires_grad_(False)
    student = copy.deepcopy(pipe.unet)
    opt = torch.optim.AdamW([student.get_parameter(n) for n in select_trainable(student, "noxattn")], lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    seconds = harness.timed(lambda: reference_erase_step(pipe.scheduler, teacher, student, opt, work.conds,
                                                         s.ddim_steps, work.latent_size, gen, reo),
                            s.device, repeats=s.steps)
    return Timing(seconds, 1)


def reference_ti(pipe, work: Workload, s: Settings) -> Timing:
    """diffusers-example style: the whole embedding table trains; old rows are restored after each step."""
    pipe.tokenizer.add_tokens(["<ref>"])
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    table = pipe.text_encoder.get_input_embeddings().weight
    keep = table.detach().clone()
    table.requires_grad_(True)
    opt = torch.optim.AdamW([table], lr=5e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer(["a photo of a <ref>"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids.to(s.device)
    latent = work.latents[:1]

    def step():
        noise = torch.randn(latent.shape, generator=gen).to(s.device)
        t = torch.randint(0, 1000, (1,), generator=gen).to(s.device)
        eps = pipe.unet(pipe.scheduler.add_noise(latent, noise, t), t,
                        encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
        torch.nn.functional.mse_loss(eps, noise).backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            table[:-1] = keep[:-1]
    return Timing(harness.timed(step, s.device, repeats=s.steps), 1)


def reference_generation(pipe, work: Workload, s: Settings) -> Timing:
    def one_at_a_time():
        for i, p in enumerate(work.prompts):
            generate(pipe, [p], [i], steps=s.gen_steps, batch_size=1)
    return Timing(harness.timed(one_at_a_time, s.device) / len(work.prompts), 1)


# -- ours ----------------------------------------------------------------------------------------
def ours_erase(pipe, work: Workload, s: Settings, reo: bool) -> Timing:
    """Our trainer as a run uses it: the pipeline's UNet is the teacher, a fp32 copy the student."""
    acc = Accelerator(mixed_precision=s.precision, cpu=s.device.type == "cpu")
    student = copy.deepcopy(pipe.unet).float()
    select_trainable(student, "noxattn")
    conds = work.conds
    if reo:
        objective = REOObjective(negatives=conds["negatives"], uncond=conds["uncond"][0], anchors=conds["anchors"])
    else:
        objective = ESDObjective(negatives=conds["negatives"][:1], uncond=conds["uncond"][0], eta=1.0)
    settings = TrainerSettings(steps=s.steps + 1, lr=1e-5, batch_size=s.batch, ddim_steps=s.ddim_steps,
                               gradient_checkpointing=s.gc, latent_size=work.latent_size, desc="ours")
    stamps = []
    stamp = lambda step, metrics: (harness.sync(acc.device), stamps.append(time.perf_counter()))  # noqa: E731
    with ErasureTrainer(acc, maybe_compile(student, s), pipe.unet, pipe.scheduler, objective, settings,
                        on_log=stamp) as trainer:
        trainer.run()
    seconds = (stamps[-1] - stamps[0]) / (len(stamps) - 1)  # the first step is the warm-up
    return Timing(seconds, s.batch * acc.num_processes)


def ours_ti(pipe, work: Workload, s: Settings) -> Timing:
    pipe.unet = maybe_compile(pipe.unet, s)
    settings = InversionSettings(steps=1, batch_size=s.batch, lr=5e-3)
    learn_token(pipe, work.latents, "<warm-up>", "church", settings, progress=False)
    harness.sync(s.device)
    start = time.perf_counter()
    learn_token(pipe, work.latents, "<ours>", "church", dataclasses.replace(settings, steps=s.steps), progress=False)
    harness.sync(s.device)
    return Timing((time.perf_counter() - start) / s.steps, s.batch)


def ours_generation(pipe, work: Workload, s: Settings) -> Timing:
    pipe.unet = maybe_compile(pipe.unet, s)
    batch = len(work.prompts)
    return Timing(harness.timed(lambda: generate(pipe, work.prompts, steps=s.gen_steps, batch_size=batch), s.device),
                  batch)


RUNS = {
    "esd": {"ref": partial(reference_erase, reo=False), "ours": partial(ours_erase, reo=False)},
    "reo": {"ref": partial(reference_erase, reo=True), "ours": partial(ours_erase, reo=True)},
    "ti": {"ref": reference_ti, "ours": ours_ti},
    "gen": {"ref": reference_generation, "ours": ours_generation},
    "scale": {"ours": partial(ours_erase, reo=False)},  # on N processes (measure_scaling)
}
TITLES = {"esd": "ESD erase step (STE)", "reo": "REO step (2 negatives, anchors)", "ti": "concept inversion step",
          "gen": "generation"}


# -- one measurement -----------------------------------------------------------------------------
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


def run_child(command: list[str], env: dict | None = None) -> dict:
    """Run a `--only` measurement in new process(es); rank 0 writes its result to a file."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        proc = subprocess.run([*command, "--result", str(result)], env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not result.is_file():
            raise RuntimeError(f"{shlex.join(command)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text())


def measure_pair(phase: str, s: Settings, argv: list[str], isolate: bool) -> dict:
    results = {}
    for impl in ("ref", "ours"):
        if isolate:
            results[impl] = run_child([sys.executable, str(SCRIPT), *argv, "--only", f"{phase}:{impl}"])
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
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        if s.device.type == "cpu":
            env["ACCELERATE_USE_CPU"] = "true"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                   str(SCRIPT), *argv, "--only", "scale:ours"]
        result = run_child(command, env)
        rows.append({"processes": n, "threads_per_process": threads,
                     "latents_per_s": result["items_per_step"] / result["s_per_step"], **result})
    for row in rows:
        row["vs_first"] = row["latents_per_s"] / rows[0]["latents_per_s"]
        row["efficiency"] = row["vs_first"] * rows[0]["processes"] / row["processes"]
    return rows


# -- the report ----------------------------------------------------------------------------------
def command_line(argv: list[str]) -> str:
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
    return prefix + shlex.join(["python", "benchmarks/speed.py", *argv])


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


# -- command line --------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--out", type=Path, default=SCRIPT.parent / "results", help="folder for the result files")
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
    memory = ("torch's peak allocated CUDA memory, reset before each measurement; loaded = allocated after "
              "loading the pipeline" if s.device.type == "cuda" else
              "peak RSS of the measuring process; loaded = its RSS right after loading the pipeline")
    if s.device.type == "cpu" and not isolate:
        memory += " (--no-isolate: one process, so the peak is the peak so far)"
    report = {
        "command": command_line(argv),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": harness.machine(),
        "settings": {"model": s.model, "device": s.device.type, "isolate": isolate, "steps": s.steps,
                     "batch": s.batch, "ddim_steps": s.ddim_steps, "gen_steps": s.gen_steps,
                     "precision": s.precision, "gc": s.gc, "compile": s.compile, "attention": ours["attention"],
                     "cores": args.cores, "memory": memory},
        "phases": rows,
        "scaling": scaling,
    }
    markdown = to_markdown(report)
    print(markdown)
    stem = args.out / f"speed_{s.model}_{s.device.type}"
    write_text_atomic(stem.with_suffix(".md"), markdown)
    write_json_atomic(stem.with_suffix(".json"), report)
    print(f"wrote {stem}.md and {stem}.json")


if __name__ == "__main__":
    main()
