"""The reference loops: what research code does. fp32, one latent/image at a time, one UNet call
per prompt, a new pipeline per stage; textual inversion trains the whole token table and restores
the old rows after each step."""

from __future__ import annotations

import copy

import torch

from benchmarks import harness
from benchmarks.speed.workload import Settings, Timing, Workload
from stereo.erasure.objectives import esd_target, reo_target
from stereo.erasure.sampling import ddim_scheduler, draw_stop_steps
from stereo.erasure.subsets import select_trainable
from stereo.generation import generate


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
