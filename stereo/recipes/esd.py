"""ESD (Gandikota et al. 2023): erase the selected concept prompts from the base UNet.

    eps* = eps_0(x_t, ∅) - eta (eps_0(x_t, c) - eps_0(x_t, ∅)),   loss = MSE(eps_theta(x_t, c, t), eps*)

on x_t from the student's own DDIM chain; only the configured parameter subset (or a LoRA) trains.
"""

from __future__ import annotations

from stereo.erasure.context import RunContext
from stereo.erasure.objectives import ESDObjective
from stereo.erasure.previews import grid_prompts, sampler, save_samples
from stereo.erasure.subsets import make_student
from stereo.erasure.trainer import ErasureTrainer, TrainerSettings


def run_esd(ctx: RunContext) -> dict:
    """Fine-tune the subset toward the ESD target for every concept prompt (balanced); export the result."""
    cfg = ctx.cfg
    prompts = ctx.concept_prompts()
    objective = ESDObjective(negatives=ctx.encode(prompts), uncond=ctx.encode([""])[0], eta=cfg.method.eta,
                             seed=ctx.seed, **ctx.preservation())
    student, teacher, names = make_student(ctx.base_unet, ctx.subset, cfg.method.lora)
    settings = TrainerSettings.from_config(cfg, ctx.latent_size)
    with ErasureTrainer(ctx.accelerator, student, teacher, ctx.pipe.scheduler, objective, settings,
                        checkpoint_dir=ctx.output_dir / "checkpoints", on_log=ctx.log,
                        on_sample=sampler(ctx, grid_prompts(ctx), "esd")) as trainer:
        result = trainer.run()
    unet = trainer.student.eval()  # closed: the plain module
    export_dir = ctx.export(unet, names, erased=prompts, final_loss=result.losses[-1] if result.losses else None)
    samples = save_samples(ctx, unet, grid_prompts(ctx), "esd")
    return {"export_dir": export_dir, "samples": samples, "losses": result.losses,
            "local_losses": result.local_losses, "unet": unet,
            "trainable": names, "seconds": result.seconds}
