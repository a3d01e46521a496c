"""Speed and memory of every STEREO phase: ours vs a plain reference loop, in the same run.

Phases: `esd` (an STE erase step), `reo` (a REO step), `ti` (a concept-inversion step), `gen`
(evaluation image generation). The reference loops are what research code does: fp32, one
latent/image at a time, one UNet call per prompt; textual inversion trains the whole token table
and restores the old rows after each step. Ours: batched CFG while sampling x_t, all teacher
predictions in one forward, B latents per step, optional bf16 autocast and gradient
checkpointing; inversion trains only the new vectors through a lookup hook; batched generation.
Throughput is compared per latent (or image) as a ratio.

  python benchmarks/speed.py --model tiny                                   # CPU
  python benchmarks/speed.py --model sd14-random --batch 4 --precision bf16 --gc   # GPU
"""

from __future__ import annotations

import argparse
import copy
import platform
import resource
import time

import torch
from accelerate import Accelerator

from stereo.attacks.inversion import InversionSettings, learn_token
from stereo.config import compose
from stereo.erasure.sampling import draw_stop_steps
from stereo.erasure.subsets import select_trainable
from stereo.erasure.trainer import ErasureTrainer, ESDObjective, REOObjective, TrainerSettings
from stereo.generation import generate
from stereo.models.loading import load_pipeline
from stereo.objectives import esd_target, reo_target

RESOLUTION = {"tiny": 32, "sd14-random": 512, "toy": 32}
PHASES = ("esd", "reo", "ti", "gen")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS so far


def timed(fn, steps: int, device) -> float:
    """Mean seconds of fn() over `steps` calls after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


# -- reference loops ---------------------------------------------------------------------------
def reference_erase_step(pipe, teacher, student, opt, conds: dict, negative, anchor, ddim_steps, latent, gen, reo):
    """One step of the reference scripts: batch 1, a UNet call per prompt everywhere."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(ddim_steps)
    stop = int(draw_stop_steps(1, ddim_steps, gen)[0])
    x = torch.randn((1, 4, latent, latent), generator=gen).to(pipe.device)
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


def reference_erase(pipe, conds, args, latent, reo: bool) -> float:
    teacher = copy.deepcopy(pipe.unet).float().requires_grad_(False)
    student = copy.deepcopy(pipe.unet).float()
    opt = torch.optim.AdamW([student.get_parameter(n) for n in select_trainable(student, "noxattn")], lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    return timed(lambda: reference_erase_step(pipe, teacher, student, opt, conds, conds["negatives"][:1],
                                              conds["anchors"][:1], args.ddim_steps, latent, gen, reo),
                 args.steps, pipe.device)


def reference_ti(pipe, latents, args) -> float:
    """diffusers-example style: the whole embedding table trains; old rows are restored after each step."""
    pipe = copy.deepcopy(pipe)
    pipe.tokenizer.add_tokens(["<ref>"])
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    table = pipe.text_encoder.get_input_embeddings().weight
    keep = table.detach().clone()
    table.requires_grad_(True)
    opt = torch.optim.AdamW([table], lr=5e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer(["a photo of a <ref>"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids.to(pipe.device)

    def step():
        noise = torch.randn(latents[:1].shape, generator=gen).to(pipe.device)
        t = torch.randint(0, 1000, (1,), generator=gen).to(pipe.device)
        eps = pipe.unet(pipe.scheduler.add_noise(latents[:1], noise, t), t,
                        encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
        torch.nn.functional.mse_loss(eps, noise).backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            table[:-1] = keep[:-1]
    return timed(step, args.steps, pipe.device)


def reference_generation(pipe, prompts, args) -> float:
    def one_at_a_time():
        for i, p in enumerate(prompts):
            generate(pipe, [p], [i], steps=args.gen_steps, batch_size=1)
    return timed(one_at_a_time, 1, pipe.device) / len(prompts)


# -- ours ----------------------------------------------------------------------------------------
def ours_erase(pipe, conds, args, latent, reo: bool) -> float:
    acc = Accelerator(mixed_precision=args.precision, cpu=not torch.cuda.is_available())
    student = copy.deepcopy(pipe.unet).float()
    select_trainable(student, "noxattn")
    teacher = copy.deepcopy(pipe.unet).to(acc.device, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    if reo:
        objective = REOObjective(negatives=conds["negatives"], uncond=conds["uncond"][0], anchors=conds["anchors"])
    else:
        objective = ESDObjective(negatives=conds["negatives"][:1], uncond=conds["uncond"][0], eta=1.0)
    settings = TrainerSettings(steps=args.steps + 1, lr=1e-5, batch_size=args.batch, ddim_steps=args.ddim_steps,
                               gradient_checkpointing=args.gc, latent_size=latent, desc="ours")
    stamps = []
    trainer = ErasureTrainer(acc, student, teacher, pipe.scheduler, objective, settings,
                             on_log=lambda step, m: (sync(acc.device), stamps.append(time.perf_counter())))
    trainer.run()
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) / args.batch  # per latent (first step = warm-up)


def ours_ti(pipe, latents, args) -> float:
    pipe = copy.deepcopy(pipe)
    settings = InversionSettings(steps=args.steps + 1, batch_size=args.batch, lr=5e-3)
    start = time.perf_counter()
    learn_token(pipe, latents, "<ours>", "church", settings, progress=False)
    sync(pipe.device)
    return (time.perf_counter() - start) / (args.steps + 1) / args.batch


def ours_generation(pipe, prompts, args) -> float:
    return timed(lambda: generate(pipe, prompts, steps=args.gen_steps, batch_size=len(prompts)), 1,
                 pipe.device) / len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=sorted(RESOLUTION))
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {PHASES}")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--gen-steps", type=int, default=25)
    parser.add_argument("--precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--gc", action="store_true", help="gradient checkpointing (ours)")
    args = parser.parse_args()
    phases = args.phases.split(",")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(compose([f"model={args.model}", "model.dtype=fp32"]).model).to(device)
    latent = RESOLUTION[args.model] // pipe.vae_scale_factor
    prompts = ["church", "", "a church on a hill", "a church in the snow", "a chapel by a lake", "a church at night"]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0].float()
    conds = {"negatives": emb[[0, 4]], "uncond": emb[1:2], "anchors": emb[2:4]}
    latents = torch.randn(4, 4, latent, latent, generator=torch.Generator().manual_seed(0)).to(device)
    gen_prompts = [p for p in prompts if p] * 2

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    print(f"machine: {name}; torch {torch.__version__}; {torch.get_num_threads()} threads; model={args.model}")
    print(f"ours: batch {args.batch}, precision {args.precision}, gradient checkpointing {args.gc}; "
          f"x_t from DDIM {args.ddim_steps} stopped at i ~ U[1, {args.ddim_steps - 1})")
    print(f"{'phase':6s} {'ref s/item':>11s} {'ours s/item':>12s} {'speed-up':>9s} {'ref MB':>8s} {'ours MB':>8s}")
    runs = {"esd": (lambda: reference_erase(pipe, conds, args, latent, False),
                    lambda: ours_erase(pipe, conds, args, latent, False)),
            "reo": (lambda: reference_erase(pipe, conds, args, latent, True),
                    lambda: ours_erase(pipe, conds, args, latent, True)),
            "ti": (lambda: reference_ti(pipe, latents, args), lambda: ours_ti(pipe, latents, args)),
            "gen": (lambda: reference_generation(pipe, gen_prompts, args),
                    lambda: ours_generation(pipe, gen_prompts, args))}
    for phase in phases:
        if phase not in runs:
            raise SystemExit(f"unknown phase {phase!r}; choose from {', '.join(PHASES)}")
        ref_fn, ours_fn = runs[phase]
        reset_peak(device)
        ref = ref_fn()
        ref_mem = peak_mb(device)
        reset_peak(device)
        ours = ours_fn()
        print(f"{phase:6s} {ref:11.4f} {ours:12.4f} {ref / ours:8.2f}x {ref_mem:8.0f} {peak_mb(device):8.0f}")
    if device.type == "cpu":
        print("items: latents (esd, reo, ti) or images (gen). CPU memory is the process's peak RSS so far.")


if __name__ == "__main__":
    main()
