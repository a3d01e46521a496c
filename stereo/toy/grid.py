"""PNG grids of real toy scenes next to generated ones, for docs/toy_world.md.

    python -m stereo.toy.grid [--out docs/img] [--guidance 4] [--seed 0]

Writes `toy_colour_shape.png` (rows: shapes; columns: colours; left real, right "a {colour}
{shape}") and `toy_shape_background.png` (rows: shapes; columns: backgrounds; left real,
right "a {shape} on a {bg} background").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from stereo.toy.quality import generate_toy_images
from stereo.toy.scenes import BACKGROUNDS, COLOURS, SHAPES, generate_scenes, render

ZOOM, GAP = 3, 12


def real_example(rng_seed: int, shape: str, colour: str | None = None, background: str | None = None) -> np.ndarray:
    """The first single-object scene of a seeded stream that matches the request."""
    for scene in generate_scenes(4000, rng_seed):
        o = scene.objects[0]
        if (len(scene.objects) == 1 and o.shape == shape and colour in (None, o.colour)
                and background in (None, scene.background)):
            return render(scene)
    raise RuntimeError(f"no real scene with {shape}/{colour}/{background} in 4000 draws")


def panel(tiles: list[list[np.ndarray]]) -> Image.Image:
    rows = [np.concatenate([np.pad(t, ((1, 1), (1, 1), (0, 0)), constant_values=255) for t in row], 1)
            for row in tiles]
    image = Image.fromarray(np.concatenate(rows, 0))
    return image.resize((image.width * ZOOM, image.height * ZOOM), Image.NEAREST)


def side_by_side(left: Image.Image, right: Image.Image, titles=("real", "generated")) -> Image.Image:
    header = 16
    canvas = Image.new("RGB", (left.width + right.width + GAP, left.height + header), "white")
    canvas.paste(left, (0, header))
    canvas.paste(right, (left.width + GAP, header))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), titles[0], fill="black")
    draw.text((left.width + GAP + 4, 2), titles[1], fill="black")
    return canvas


def make_grids(pipe, out: Path, guidance: float = 4.0, seed: int = 0) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)

    def fake(prompt: str, i: int) -> np.ndarray:
        return np.asarray(generate_toy_images(pipe, prompt, 1, guidance, 25, seed + i)[0])

    real = [[real_example(seed, s, colour=c) for c in COLOURS] for s in SHAPES]
    gen = [[fake(f"a {c} {s}", 5 * i + j) for j, c in enumerate(COLOURS)] for i, s in enumerate(SHAPES)]
    path_cs = out / "toy_colour_shape.png"
    side_by_side(panel(real), panel(gen)).save(path_cs)
    real = [[real_example(seed, s, background=b) for b in BACKGROUNDS] for s in SHAPES]
    gen = [[fake(f"a {s} on a {b} background", 100 + 3 * i + j) for j, b in enumerate(BACKGROUNDS)]
           for i, s in enumerate(SHAPES)]
    path_sb = out / "toy_shape_background.png"
    side_by_side(panel(real), panel(gen)).save(path_sb)
    return [path_cs, path_sb]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (use 1 on a busy machine)")
    parser.add_argument("--weights", type=Path, default=None)
    args = parser.parse_args(argv)
    from stereo.toy import load_toy_pipeline

    torch.set_num_threads(args.threads)
    for path in make_grids(load_toy_pipeline(args.weights), args.out, args.guidance, args.seed):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
