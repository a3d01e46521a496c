"""Seconds per erase step and peak memory: stereo's trainer vs a plain reference loop, same run.

The reference loop is what research code does: fp32, one latent per step, one UNet call per
prompt (cond and uncond separately while sampling x_t, then teacher ∅, teacher c, student).
Ours: batched CFG while sampling, all teacher predictions in one forward, B latents per step,
optional bf16 autocast and gradient checkpointing. Throughput is compared per latent.

  python benchmarks/erase_step.py --model tiny --steps 6                 # CPU
  python benchmarks/erase_step.py --model sd14-random --batch 4 --precision bf16 --gc   # GPU
"""

from __future__ import annotations

import argparse
import copy
import platform
import resource
import time

import torch
from accelerate import Accelerator

from stereo.config import compose
from stereo.erasure.sampling import draw_stop_steps
from stereo.erasure.subsets import select_trainable
from stereo.erasure.trainer import ErasureTrainer, ESDObjective, TrainerSettings
from stereo.models.loading import load_pipeline
from stereo.objectives import esd_target

RESOLUTION = {"tiny": 32, "sd14-random": 512}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_loop(pipe, cond, uncond, steps, ddim_steps, latent, device) -> float:
    """fp32, batch 1, one UNet call per prompt — the shape of the ESD/STEREO reference scripts."""
    teacher = copy.deepcopy(pipe.unet).float().to(device).requires_grad_(False)
    student = copy.deepcopy(pipe.unet).float().to(device)
    opt = torch.optim.AdamW([student.get_parameter(n) for n in select_trainable(student, "noxattn")], lr=1e-5)
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(ddim_steps, device=device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    times = []
    for step in range(steps + 1):
        sync(device)
        start = time.perf_counter()
        stop = int(draw_stop_steps(1, ddim_steps, gen)[0])
        x = torch.randn((1, 4, latent, latent), generator=gen).to(device)
        with torch.no_grad():
            for k in range(stop):
                t = scheduler.timesteps[k]
                e_u = student(x, t, encoder_hidden_states=uncond).sample
                e_c = student(x, t, encoder_hidden_states=cond).sample
                x = scheduler.step(e_u + 3.0 * (e_c - e_u), t, x).prev_sample
            t = scheduler.timesteps[stop]
            target = esd_target(teacher(x, t, encoder_hidden_states=uncond).sample,
                                teacher(x, t, encoder_hidden_states=cond).sample, 1.0)
        loss = torch.nn.functional.mse_loss(student(x, t, encoder_hidden_states=cond).sample, target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sync(device)
        if step:  # the first step warms up kernels and allocators
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def ours(pipe, cond, uncond, args, latent) -> float:
    acc = Accelerator(mixed_precision=args.precision, cpu=not torch.cuda.is_available())
    student = copy.deepcopy(pipe.unet).float()
    select_trainable(student, "noxattn")
    teacher = pipe.unet.to(acc.device, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    settings = TrainerSettings(steps=args.steps + 1, lr=1e-5, batch_size=args.batch, ddim_steps=args.ddim_steps,
                               gradient_checkpointing=args.gc, latent_size=latent, desc="ours")
    objective = ESDObjective(negatives=cond, uncond=uncond[0], eta=1.0)
    times, last = [], [time.perf_counter()]

    def on_log(step, metrics):
        sync(acc.device)
        now = time.perf_counter()
        if step > 1:
            times.append(now - last[0])
        last[0] = now
    trainer = ErasureTrainer(acc, student, teacher, pipe.scheduler, objective, settings, on_log=on_log)
    trainer.run()
    return sum(times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=sorted(RESOLUTION))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--gc", action="store_true", help="gradient checkpointing (ours)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(compose([f"model={args.model}", "model.dtype=fp32"]).model)
    pipe.to(device)
    latent = RESOLUTION[args.model] // pipe.vae_scale_factor
    ids = pipe.tokenizer(["church", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = pipe.text_encoder(ids.to(device))[0].float()
    cond, uncond = emb[:1], emb[1:]

    reset_peak(device)
    ref_s = reference_loop(pipe, cond, uncond, args.steps, args.ddim_steps, latent, device)
    ref_mem = peak_memory_mb(device)
    reset_peak(device)
    our_s = ours(pipe, cond, uncond, args, latent)
    our_mem = peak_memory_mb(device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"machine: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"model={args.model} ddim_steps={args.ddim_steps} (x_t sampled for i ~ U[1, {args.ddim_steps - 1}))")
    print(f"{'':28s} {'s/step':>8s} {'latents/s':>10s} {'peak MB':>9s}")
    print(f"{'reference (fp32, batch 1)':28s} {ref_s:8.3f} {1 / ref_s:10.3f} {ref_mem:9.0f}")
    label = f"ours (batch {args.batch}, {args.precision}{', gc' if args.gc else ''})"
    print(f"{label:28s} {our_s:8.3f} {args.batch / our_s:10.3f} {our_mem:9.0f}")
    print(f"throughput ratio (ours / reference, latents per second): {(args.batch / our_s) / (1 / ref_s):.2f}x")
    if device.type == "cpu":
        print("note: on CPU, peak MB is the process's peak RSS so far (not per phase).")


if __name__ == "__main__":
    main()
