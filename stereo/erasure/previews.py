"""Sample grids of a run: the base model beside the erased one, saved as PNG and logged."""

from __future__ import annotations

from pathlib import Path

from stereo.erasure.context import RunContext
from stereo.generation import generate, image_grid, swap_unet


def draw(ctx: RunContext, unet, prompts: list[str], seeds: list[int]) -> list:
    """Images of `prompts[i]` with `seeds[i]` from `unet` in the run's pipeline (preview settings)."""
    t, res = ctx.cfg.trainer, ctx.cfg.model.resolution
    with swap_unet(ctx.pipe, unet) as pipe:  # the student is generated from as a frozen copy
        return generate(pipe, prompts, seeds, steps=t.sample_steps, guidance=t.sample_guidance, height=res,
                        width=res)


def grid_prompts(ctx: RunContext, extra: list[str] = ()) -> list[str]:
    """The concept prompts, `extra` ones (e.g. adversarial prompts), then each neighbour's first prompt: a grid
    that shows what else the erasure touched, not only that the concept is gone."""
    return [*ctx.concept_prompts(), *extra, *(prompts[0] for prompts in ctx.neighbours().values() if prompts)]


def save_samples(ctx: RunContext, unet, prompts: list[str], name: str, seeds=(0, 1)) -> Path | None:
    """A grid (rows: base model, erased model; columns: prompt × seed) in `samples/NAME.png`, and logged."""
    if not ctx.accelerator.is_main_process:
        return None
    cols = [(p, s) for p in prompts for s in seeds]
    images = []
    for model in (ctx.base_unet, unet):
        images += draw(ctx, model, [p for p, _ in cols], [s for _, s in cols])
    path = ctx.output_dir / "samples" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(images, cols=len(cols))
    grid.save(path)
    if ctx.cfg.logger.name == "wandb" and ctx.cfg.logger.log_images:
        import wandb

        ctx.accelerator.get_tracker("wandb", unwrap=True).log({f"samples/{name}": wandb.Image(grid)})
    return path


def sampler(ctx: RunContext, prompts: list[str], desc: str):
    """An `on_sample(step, unet)` callback for the trainer: a base-vs-erased grid named after the step."""
    return lambda step, unet: save_samples(ctx, unet, prompts, f"{desc}_step{step:07d}")
