"""CLIP score (Hessel et al. 2021): prompt-image agreement of generations, with a local CLIPModel.

    CLIPScore(image, text) = 100 * max(cos(E_I(image), E_T(text)), 0)

E_I / E_T are CLIP's projected image and text embeddings. The clamp at 0 follows the usual
convention (torchmetrics' `CLIPScore`); Hessel et al. use w * max(cos, 0) with w = 2.5 instead
of 100. SD papers use CLIP ViT-L/14 (`openai/clip-vit-large-patch14`), and report the mean over
images; we also keep per-image values and the sample standard deviation (ddof = 1).

Models load from a local folder only (a `save_pretrained` CLIPModel + its processor files).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

CLIP_MAX_TOKENS = 77


@dataclass
class CLIPScoreResult:
    per_image: list[float]
    mean: float
    std: float  # sample standard deviation over images (0 for a single image)
    n: int
    model: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def local_model_folder(path: str | Path, what: str, example: str = "") -> Path:
    """`path` if it holds a saved transformers model, else a FileNotFoundError saying how to make one offline."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"No {what} folder at {folder} (expected config.json, weights and preprocessor files). Models are "
            f"never downloaded here: save one with `save_pretrained(dir)`{example} on a machine with network "
            "and point the config at that folder."
        )
    return folder


def load_clip(path: str | Path, device: str | torch.device = "cpu"):
    """`(CLIPModel, CLIPProcessor)` from a local folder (model weights, config, tokenizer, preprocessor)."""
    from transformers import CLIPModel, CLIPProcessor

    folder = local_model_folder(path, "CLIP model", " (e.g. openai/clip-vit-large-patch14's CLIPModel and "
                                "CLIPProcessor)")
    model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    return model, processor


@torch.no_grad()
def clip_embeddings(model, processor, images: Sequence[Image.Image], texts: Sequence[str]):
    """Unit-norm projected embeddings: images `(N, P)` and texts `(M, P)`."""
    device = next(model.parameters()).device
    inputs = processor(
        text=list(texts), images=[im.convert("RGB") for im in images], return_tensors="pt",
        padding=True, truncation=True, max_length=CLIP_MAX_TOKENS,
    ).to(device)
    outputs = model(**inputs)
    return outputs.image_embeds, outputs.text_embeds  # CLIPModel already L2-normalises both


def clip_scores(
    images: Sequence[Image.Image], prompts: Sequence[str], model, processor, batch_size: int = 32,
    model_name: str | None = None,
) -> CLIPScoreResult:
    """Per-image CLIP score of `images[i]` against `prompts[i]`, with mean and std."""
    if len(images) != len(prompts) or not images:
        raise ValueError(f"CLIP score needs one prompt per image and at least one image; got "
                         f"{len(images)} images and {len(prompts)} prompts.")
    scores: list[float] = []
    for start in range(0, len(images), batch_size):
        image_emb, text_emb = clip_embeddings(
            model, processor, images[start:start + batch_size], prompts[start:start + batch_size]
        )
        cosine = (image_emb * text_emb).sum(dim=-1)  # (B,)
        scores.extend((100 * cosine.clamp(min=0)).double().cpu().tolist())
    values = np.asarray(scores)
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    name = model_name or getattr(model.config, "_name_or_path", "") or "CLIPModel"
    return CLIPScoreResult(scores, float(values.mean()), std, len(values), name)


def clip_score(
    images: Sequence[Image.Image], prompts: Sequence[str], clip_path: str | Path,
    device: str | torch.device = "cpu", batch_size: int = 32,
) -> CLIPScoreResult:
    """Load the CLIP model at `clip_path` and score `images` against `prompts`."""
    model, processor = load_clip(clip_path, device)
    return clip_scores(images, prompts, model, processor, batch_size, model_name=str(clip_path))
