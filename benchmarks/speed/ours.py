"""Ours, as a run uses it: batched CFG while sampling x_t, all teacher predictions in one forward,
B latents per step, optional bf16 (autocast, frozen parts in bf16), gradient checkpointing and
torch.compile; inversion trains only the new vectors; batched generation."""

from __future__ import annotations

import copy
import dataclasses
import time

from accelerate import Accelerator

from benchmarks import harness
from benchmarks.speed.workload import Settings, Timing, Workload, maybe_compile
from stereo.attacks.inversion import InversionSettings, learn_token
from stereo.erasure.objectives import ESDObjective, REOObjective
from stereo.erasure.subsets import select_trainable
from stereo.erasure.trainer import ErasureTrainer, TrainerSettings
from stereo.generation import generate


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
