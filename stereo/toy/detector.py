"""The toy concept detector: a small CNN that reads shapes, colours and backgrounds of toy scenes.

Heads (all from one convolutional trunk):
- shape presence: 5 sigmoids, max-pooled over positions (an object anywhere counts);
- colour presence: 5 sigmoids, max-pooled;
- colour-shape binding: 25 sigmoids "{colour} {shape}", max-pooled;
- background kind: 3-way softmax over average-pooled features.
It plays, for the toy world, the role NudeNet or an ImageNet classifier plays for SD; `register()`
adds it to the evaluation's detectors as `toy`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from stereo.evaluation.detectors import Detection, Detector, register_detector
from stereo.toy.fit import one_cycle_fit
from stereo.toy.scenes import BACKGROUNDS, COLOURS, IMAGE_SIZE, SHAPES, Scene, render_all

PAIRS = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)  # index = 5 * shape + colour
CONCEPTS = SHAPES + COLOURS + BACKGROUNDS + PAIRS


class ToyDetectorNet(nn.Module):
    """Conv trunk 32 -> 16 -> 8 px, then per-position presence logits and a background head."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.trunk = nn.Sequential(
            *block(3, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), *block(4 * w, 4 * w),
        )
        n_presence = len(SHAPES) + len(COLOURS) + len(PAIRS)
        self.presence = nn.Conv2d(4 * w, n_presence, 1)
        self.background = nn.Linear(4 * w, len(BACKGROUNDS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 3, 32, 32) in [0, 1] -> presence logits (B, 35), background logits (B, 3)."""
        h = self.trunk(x * 2 - 1)  # (B, 4w, 8, 8)
        presence = self.presence(h).amax(dim=(2, 3))
        background = self.background(h.mean(dim=(2, 3)))
        return presence, background


def scene_targets(scenes: Sequence[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-hot presence targets (N, 35) in the order SHAPES, COLOURS, PAIRS, and background ids (N,)."""
    presence = torch.zeros(len(scenes), len(SHAPES) + len(COLOURS) + len(PAIRS))
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            presence[i, SHAPES.index(o.shape)] = 1
            presence[i, len(SHAPES) + COLOURS.index(o.colour)] = 1
            presence[i, len(SHAPES) + len(COLOURS) + PAIRS.index(f"{o.colour} {o.shape}")] = 1
    background = torch.tensor([BACKGROUNDS.index(s.background) for s in scenes])
    return presence, background


def to_tensor(images) -> torch.Tensor:
    """PIL images, or a (N, 32, 32, 3) uint8 array -> (N, 3, 32, 32) float in [0, 1].

    PIL images of another size are resized to 32x32 (bilinear), as detectors resize their input.
    """
    if isinstance(images, np.ndarray):
        arrays = images
    else:
        arrays = np.stack([
            np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
                       if im.size != (IMAGE_SIZE, IMAGE_SIZE) else im.convert("RGB"))
            for im in images
        ])
    if arrays.ndim != 4 or arrays.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"expected images of shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), got {arrays.shape}")
    return torch.from_numpy(np.ascontiguousarray(arrays)).permute(0, 3, 1, 2).float() / 255


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, noise and a brightness shift, so the detector also reads imperfect generated images."""
    b = x.shape[0]
    kernel = torch.tensor([1.0, 2.0, 1.0]) / 4
    kernel2d = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel2d, groups=3)
    mix = torch.rand(b, 1, 1, 1, generator=generator)
    x = x + mix * (blurred - x)
    x = x + torch.randn(x.shape, generator=generator) * 0.06 * torch.rand(b, 1, 1, 1, generator=generator)
    x = x + (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.1
    return x.clamp(0, 1)


def train_detector(scenes: Sequence[Scene], images: np.ndarray, steps: int, seed: int,
                   batch_size: int = 64, lr: float = 3e-3, log_every: int = 100) -> ToyDetectorNet:
    """Train the detector on rendered scenes (BCE on presence + CE on background), AdamW, cosine lr."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = ToyDetectorNet()
    x_all = to_tensor(images)
    presence, background = scene_targets(scenes)

    def batch_loss():
        idx = torch.randint(len(x_all), (batch_size,), generator=generator)
        logits_p, logits_b = net(augment(x_all[idx], generator))
        return F.binary_cross_entropy_with_logits(logits_p, presence[idx]) + F.cross_entropy(logits_b, background[idx])
    net.train()
    one_cycle_fit(net.parameters(), steps, lr, batch_loss, name="detector", weight_decay=1e-4, log_every=log_every)
    return net.eval()


@torch.no_grad()
def predict_with(net: ToyDetectorNet, images, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Label probabilities (N,) for every concept name in CONCEPTS."""
    x = to_tensor(images)
    net.eval()
    outs_p, outs_b = [], []
    for i in range(0, len(x), batch_size):
        p, b = net(x[i:i + batch_size])
        outs_p.append(torch.sigmoid(p))
        outs_b.append(torch.softmax(b, dim=1))
    p = torch.cat(outs_p) if outs_p else torch.zeros(0, len(SHAPES) + len(COLOURS) + len(PAIRS))
    b = torch.cat(outs_b) if outs_b else torch.zeros(0, len(BACKGROUNDS))
    names = SHAPES + COLOURS + PAIRS
    probs = {name: p[:, i] for i, name in enumerate(names)}
    probs.update({name: b[:, i] for i, name in enumerate(BACKGROUNDS)})
    return probs


def detector_accuracy(net: ToyDetectorNet, scenes: Sequence[Scene], images: np.ndarray | None = None) -> dict:
    """Held-out accuracy per head: shape/colour presence (per label), binding, background.

    binding: for every object, the most probable colour for its shape (among the 5 pair heads)
    is its true colour.
    """
    images = render_all(list(scenes)) if images is None else images
    probs = predict_with(net, images)
    presence, background = scene_targets(scenes)
    shapes_pred = torch.stack([probs[s] for s in SHAPES], 1) >= 0.5
    colours_pred = torch.stack([probs[c] for c in COLOURS], 1) >= 0.5
    n_s, n_c = len(SHAPES), len(COLOURS)
    hits, total = 0, 0
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            colour_probs = torch.stack([probs[f"{c} {o.shape}"][i] for c in COLOURS])
            hits += int(COLOURS[int(colour_probs.argmax())] == o.colour)
            total += 1
    bg_pred = torch.stack([probs[b] for b in BACKGROUNDS], 1).argmax(1)
    return {
        "shape": (shapes_pred == presence[:, :n_s].bool()).float().mean().item(),
        "shape_set": (shapes_pred == presence[:, :n_s].bool()).all(1).float().mean().item(),
        "colour": (colours_pred == presence[:, n_s:n_s + n_c].bool()).float().mean().item(),
        "binding": hits / max(total, 1),
        "background": (bg_pred == background).float().mean().item(),
        "n_images": len(scenes),
    }


def save_detector(net: ToyDetectorNet, path: Path, extra: dict | None = None) -> None:
    """Weights to `path` (safetensors) and the config beside it (`path` with .json)."""
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    config = {"width": net.trunk[0].out_channels, "concepts": list(CONCEPTS), **(extra or {})}
    Path(path).with_suffix(".json").write_text(json.dumps(config, indent=2))


def load_detector_net(path: Path) -> ToyDetectorNet:
    """Load a detector saved by `save_detector`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"toy weights missing: no detector at {path}; run `python -m stereo.toy.pretrain`")
    config = json.loads(path.with_suffix(".json").read_text())
    net = ToyDetectorNet(width=config["width"])
    net.load_state_dict(load_file(str(path)))
    return net.eval()


@lru_cache(maxsize=4)
def _cached_net(path: str) -> ToyDetectorNet:
    return load_detector_net(Path(path))


class ToyDetector(Detector):
    """Detector for one toy concept: a shape, a colour, a background kind or a "{colour} {shape}".

    score = probability the concept is in the image (for backgrounds: the softmax probability).
    """

    name = "toy"

    def __init__(self, concept: str, threshold: float = 0.5, weights: Path | str | None = None):
        if concept not in CONCEPTS:
            raise ValueError(
                f"unknown toy concept {concept!r}; expected a shape {SHAPES}, a colour {COLOURS}, "
                f"a background {BACKGROUNDS} or a '{{colour}} {{shape}}' pair such as 'red circle'"
            )
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        from stereo.toy import TOY_WEIGHTS_DIR

        self.concept, self.threshold = concept, threshold
        self.weights = Path(weights) if weights is not None else TOY_WEIGHTS_DIR / "detector.safetensors"
        self.net = _cached_net(str(self.weights))

    def predict(self, images) -> dict[str, torch.Tensor]:
        """Probabilities of every toy concept, {name: (N,)}."""
        return predict_with(self.net, images)

    def detect(self, images: Sequence[Image.Image]) -> Detection:
        scores = self.predict(images)[self.concept].tolist()
        return Detection(scores=scores, flags=[s >= self.threshold for s in scores])

    def describe(self) -> dict:
        import hashlib

        digest = hashlib.sha256(self.weights.read_bytes()).hexdigest()
        return {"name": self.name, "concept": self.concept, "threshold": self.threshold,
                "weights": str(self.weights), "sha256": digest}


def register() -> None:
    """Make `detector: {name: toy, concept: ...}` build a ToyDetector (evaluate.py calls it; idempotent)."""
    register_detector("toy", ToyDetector)


def predict(images, weights: Path | str | None = None) -> dict[str, torch.Tensor]:
    """Probabilities of every toy concept for images, with the committed detector (or `weights`)."""
    from stereo.toy import TOY_WEIGHTS_DIR

    path = Path(weights) if weights is not None else TOY_WEIGHTS_DIR / "detector.safetensors"
    return predict_with(_cached_net(str(path)), images)

