"""How well the toy text-to-image model follows prompts, read by the toy detector.

    python -m stereo.toy.quality [--images 128] [--guidance 4] [--steps 25] [--seed 0] [--json FILE]

For every "a {colour} {shape}" prompt: the share of generated images in which the detector
finds the prompted shape, the prompted colour, and the pair "{colour} {shape}"; for every
"a {shape} on a {bg} background": the prompted shape and background. Bar: >= 90% everywhere.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from stereo.toy.scenes import BACKGROUNDS, COLOURS, SHAPES, TEMPLATE_COLOUR_SHAPE, TEMPLATE_SHAPE_BG

QUALITY_BAR = 0.9


def quality_prompts() -> list[tuple[str, dict]]:
    """(prompt, concepts it asks for) for the colour-shape and shape-background grids."""
    prompts = [(TEMPLATE_COLOUR_SHAPE.format(colour=c, shape=s), {"shape": s, "colour": c, "pair": f"{c} {s}"})
               for s in SHAPES for c in COLOURS]
    prompts += [(TEMPLATE_SHAPE_BG.format(shape=s, bg=b), {"shape": s, "background": b})
                for s in SHAPES for b in BACKGROUNDS]
    return prompts


@torch.no_grad()
def generate_toy_images(pipe, prompt: str, n: int, guidance: float, steps: int, seed: int) -> list:
    """n images of one prompt (DDIM, classifier-free guidance) from ONE generator seeded per prompt.

    Not `stereo.generation.generate` (one seed per image): the committed quality table and grids were
    made this way, and a per-image seed would change them.
    """
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_images_per_prompt=n, guidance_scale=guidance, num_inference_steps=steps,
                generator=generator, output_type="pil").images


def measure_quality(pipe, prompts: list[tuple[str, dict]], n: int = 16, guidance: float = 4.0, steps: int = 25,
                    seed: int = 0, weights: Path | None = None) -> list[dict]:
    """One row per prompt: {"prompt", "<what>": detection rate} for each concept the prompt names."""
    from stereo.toy.detector import predict

    pipe.set_progress_bar_config(disable=True)
    rows = []
    for i, (prompt, wanted) in enumerate(prompts):
        probs = predict(generate_toy_images(pipe, prompt, n, guidance, steps, seed + i), weights=weights)
        rows.append({"prompt": prompt, **{what: (probs[concept] >= 0.5).float().mean().item()
                                          for what, concept in wanted.items()}})
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of detection rates (%), with the minimum of each column last."""
    columns = ["shape", "colour", "pair", "background"]
    lines = ["| prompt | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for row in rows:
        cells = [f"{100 * row[c]:.0f}" if c in row else "" for c in columns]
        lines.append(f"| {row['prompt']} | " + " | ".join(cells) + " |")
    mins = [min((r[c] for r in rows if c in r), default=None) for c in columns]
    lines.append("| **minimum** | " + " | ".join(f"**{100 * m:.0f}**" if m is not None else "" for m in mins) + " |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    """Minimum and mean rate per column, and whether the 90% bar holds for shape, colour, background."""
    out = {}
    for c in ("shape", "colour", "pair", "background"):
        values = [r[c] for r in rows if c in r]
        if values:
            out[c] = {"min": min(values), "mean": sum(values) / len(values)}
    out["passes_bar"] = all(out[c]["min"] >= QUALITY_BAR for c in ("shape", "colour", "background") if c in out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128, help="images per prompt (16 for a quick look)")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (use 1 on a busy machine)")
    parser.add_argument("--weights", type=Path, default=None, help="toy weights folder (default: the committed one)")
    parser.add_argument("--json", type=Path, default=None, help="also write rows + summary here")
    args = parser.parse_args(argv)
    from stereo.toy import TOY_WEIGHTS_DIR, load_toy_pipeline

    torch.set_num_threads(args.threads)
    weights = args.weights or TOY_WEIGHTS_DIR
    rows = measure_quality(load_toy_pipeline(weights), quality_prompts(), args.images, args.guidance, args.steps,
                           args.seed, weights / "detector.safetensors")
    print(format_table(rows))
    result = summary(rows)
    print(json.dumps(result, indent=2))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps({"settings": {**settings, "weights": str(weights)}, "rows": rows,
                                         "summary": result}, indent=2))


if __name__ == "__main__":
    main()
