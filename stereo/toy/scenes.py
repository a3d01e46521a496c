"""The toy world: seeded 32x32 scenes of coloured shapes on textured grey backgrounds.

A scene holds one or two objects of distinct shapes, each with a colour, a centre and a
radius, on one background kind. Objects use saturated colours and backgrounds are pure grey
(R = G = B), so the labels can be checked from pixels alone. Captions follow the fixed
templates below; other parts of the project (anchors, prompts) write prompts in this grammar.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple")
BACKGROUNDS = ("plain", "striped", "dotted")
IMAGE_SIZE = 32

# Caption templates (the world's whole grammar).
TEMPLATE_COLOUR_SHAPE = "a {colour} {shape}"
TEMPLATE_PHOTO = "a photo of a {colour} {shape}"
TEMPLATE_COLOUR_SHAPE_BG = "a {colour} {shape} on a {bg} background"
TEMPLATE_TWO = "a {c1} {s1} and a {c2} {s2}"
TEMPLATE_TWO_BG = "a {c1} {s1} and a {c2} {s2} on a {bg} background"
TEMPLATE_SHAPE = "a {shape}"
TEMPLATE_SHAPE_BG = "a {shape} on a {bg} background"
SINGLE_TEMPLATES = (
    TEMPLATE_COLOUR_SHAPE, TEMPLATE_PHOTO, TEMPLATE_COLOUR_SHAPE_BG, TEMPLATE_SHAPE, TEMPLATE_SHAPE_BG,
)
PAIR_TEMPLATES = (TEMPLATE_TWO, TEMPLATE_TWO_BG)

# Nominal RGB of each colour; every object jitters each channel by up to COLOUR_JITTER.
COLOUR_RGB = {
    "red": (215, 35, 35),
    "green": (40, 175, 50),
    "blue": (35, 70, 215),
    "yellow": (230, 205, 35),
    "purple": (145, 45, 185),
}
COLOUR_JITTER = 15
SUPERSAMPLE = 2  # draw at 64x64 and average 2x2 blocks: anti-aliased edges


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    cx: float  # centre in pixels of the 32x32 image
    cy: float
    radius: float  # circumscribed radius in pixels
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str
    grey: int  # background grey level
    pattern: tuple[float, ...]  # striped: (vertical?, period, phase); dotted: (spacing, ox, oy)
    caption: str


def _polygon_vertices(shape: str) -> np.ndarray:
    """Vertices (unit circumradius, y down) of a polygon star-shaped about the origin."""
    if shape == "square":
        s = 0.8
        return np.array([(s, s), (-s, s), (-s, -s), (s, -s)])
    if shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        return np.stack([np.cos(angles), np.sin(angles) + 0.2], 1)  # shift down: centred by area
    if shape == "star":
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles) + 0.05], 1)
    if shape == "cross":
        w = 0.32
        return np.array([(w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w), (-w, -1),
                         (w, -1), (w, -w), (1, -w), (1, w)])
    raise ValueError(f"no polygon for shape {shape!r}; expected one of {SHAPES[1:]}")


def _inside_star_polygon(dx: np.ndarray, dy: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """True where (dx, dy) lies in a polygon that is star-shaped about the origin.

    The polygon is cut into triangles (origin, v_i, v_i+1); a point is inside when it is on the
    origin's side of the edge of the sector its angle falls in.
    """
    angles = np.arctan2(vertices[:, 1], vertices[:, 0])
    order = np.argsort(angles)
    v, va = vertices[order], angles[order]
    theta = np.arctan2(dy, dx)
    hi = np.searchsorted(va, theta) % len(v)
    lo = (hi - 1) % len(v)
    ax, ay, bx, by = v[lo, 0], v[lo, 1], v[hi, 0], v[hi, 1]
    side_point = (bx - ax) * (dy - ay) - (by - ay) * (dx - ax)
    side_origin = (bx - ax) * (0 - ay) - (by - ay) * (0 - ax)
    return side_point * side_origin >= 0


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Coverage in [0, 1] of each pixel of a size x size image by one shape (anti-aliased)."""
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    dx = (coords[None, :] - cx) / radius
    dy = (coords[:, None] - cy) / radius
    if shape == "circle":
        inside = dx**2 + dy**2 <= 0.9**2
    else:
        inside = _inside_star_polygon(dx, dy, _polygon_vertices(shape))
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def _background(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Grey background (size, size) in [0, 255]: plain, stripes, or a grid of dots."""
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(coords, coords)
    dark = np.zeros((n, n), bool)
    if scene.background == "striped":
        vertical, period, phase = scene.pattern
        t = x if vertical else y
        dark = ((t + phase) % period) < period / 2
    elif scene.background == "dotted":
        spacing, ox, oy = scene.pattern
        ddx = (x - ox) % spacing - spacing / 2
        ddy = (y - oy) % spacing - spacing / 2
        dark = ddx**2 + ddy**2 <= 1.3**2
    level = np.where(dark, scene.grey - 75, scene.grey).astype(float)
    return level.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def render(scene: Scene) -> np.ndarray:
    """The scene as a (32, 32, 3) uint8 RGB array."""
    image = np.repeat(_background(scene)[:, :, None], 3, axis=2)
    for obj in scene.objects:
        cover = shape_mask(obj.shape, obj.cx, obj.cy, obj.radius)[:, :, None]
        image = image * (1 - cover) + np.array(obj.rgb, float) * cover
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def object_masks(scene: Scene) -> list[np.ndarray]:
    """Boolean (32, 32) mask per object of the pixels it fully covers (later objects on top)."""
    masks = []
    for i, obj in enumerate(scene.objects):
        mask = shape_mask(obj.shape, obj.cx, obj.cy, obj.radius) >= 1.0
        for later in scene.objects[i + 1:]:
            mask &= shape_mask(later.shape, later.cx, later.cy, later.radius) == 0
        masks.append(mask)
    return masks


def captions_for(scene: Scene) -> list[str]:
    """Every caption the templates allow for a scene (object order may swap for pairs)."""
    bg = scene.background
    if len(scene.objects) == 1:
        o = scene.objects[0]
        return [t.format(colour=o.colour, shape=o.shape, bg=bg) for t in SINGLE_TEMPLATES]
    a, b = scene.objects
    return [
        t.format(c1=p.colour, s1=p.shape, c2=q.colour, s2=q.shape, bg=bg)
        for t in PAIR_TEMPLATES for p, q in ((a, b), (b, a))
    ]


def labels(scene: Scene) -> dict:
    """Ground truth of a scene: {"shapes": frozenset, "colours": {shape: colour}, "background": str}."""
    return {
        "shapes": frozenset(o.shape for o in scene.objects),
        "colours": {o.shape: o.colour for o in scene.objects},
        "background": scene.background,
    }


def _sample_object(rng: np.random.Generator, shape: str, radius: float, cx: float, cy: float) -> SceneObject:
    colour = COLOURS[rng.integers(len(COLOURS))]
    rgb = tuple(int(np.clip(c + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1), 0, 255))
                for c in COLOUR_RGB[colour])
    return SceneObject(shape, colour, float(cx), float(cy), float(radius), rgb)


def _place(rng: np.random.Generator, radius: float) -> tuple[float, float]:
    lo, hi = radius + 0.5, IMAGE_SIZE - radius - 0.5
    return rng.uniform(lo, hi), rng.uniform(lo, hi)


def sample_scene(rng: np.random.Generator, p_two: float = 0.4) -> Scene:
    """Draw one scene: 1 object (radius 7-11 px) or 2 distinct non-overlapping ones (5.5-8 px)."""
    n_objects = 2 if rng.random() < p_two else 1
    shapes = rng.choice(len(SHAPES), size=n_objects, replace=False)
    if n_objects == 1:
        radius = rng.uniform(7, 11)
        objects = (_sample_object(rng, SHAPES[shapes[0]], radius, *_place(rng, radius)),)
    else:
        r1, r2 = rng.uniform(5.5, 8, size=2)
        while True:  # rejection sampling of both centres until the objects are apart
            (x1, y1), (x2, y2) = _place(rng, r1), _place(rng, r2)
            if np.hypot(x2 - x1, y2 - y1) >= r1 + r2 + 1:
                break
        objects = (_sample_object(rng, SHAPES[shapes[0]], r1, x1, y1),
                   _sample_object(rng, SHAPES[shapes[1]], r2, x2, y2))
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    grey = int(rng.integers(160, 236))
    if background == "striped":
        pattern = (float(rng.integers(2)), float(rng.integers(5, 8)), float(rng.uniform(0, 8)))
    elif background == "dotted":
        pattern = (float(rng.integers(5, 7)), float(rng.uniform(0, 6)), float(rng.uniform(0, 6)))
    else:
        pattern = ()
    scene = Scene(objects, background, grey, pattern, caption="")
    options = captions_for(scene)
    return Scene(objects, background, grey, pattern, caption=options[rng.integers(len(options))])


def generate_scenes(n: int, seed: int) -> list[Scene]:
    """n scenes from a seed; the same (n, seed) always gives the same scenes."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def render_all(scenes: list[Scene]) -> np.ndarray:
    """(N, 32, 32, 3) uint8 images of a list of scenes."""
    return np.stack([render(s) for s in scenes]) if scenes else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


def parse_prompt(prompt: str) -> dict:
    """The shapes, colours ({shape: colour}) and background named by a prompt of the grammar above.

    Words outside the world's vocabulary are ignored; a colour binds to the shape after it.
    """
    words = prompt.lower().replace(",", " ").split()
    shapes, colours, background, pending = [], {}, None, None
    for i, word in enumerate(words):
        if word in COLOURS:
            pending = word
        elif word in SHAPES:
            shapes.append(word)
            if pending:
                colours[word] = pending
            pending = None
        elif word in BACKGROUNDS and i + 1 < len(words) and words[i + 1] == "background":
            background = word
    return {"shapes": frozenset(shapes), "colours": colours, "background": background}
