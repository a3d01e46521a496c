"""Detectors from local `transformers` models: an image classifier (objects) and CLIP zero-shot (any concept)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from stereo.evaluation.clip_score import local_model_folder
from stereo.evaluation.detectors import Detection, Detector, register_detector, rgb

# --- objects: an image classifier ------------------------------------------------------------
# ImageNet-1k indices of the object concepts used in the erasure literature (Imagenette classes).
IMAGENET_CLASS_IDS = {"tench": 0, "church": 497, "garbage_truck": 569, "parachute": 701}


@register_detector("image_classifier")
class ImageClassifierDetector(Detector):
    """Any `transformers` image classifier (e.g. ImageNet ResNet-50) from a local folder.

    Decision: the top-1 class is one of `target_ids` (the object-erasure convention).
    Score: the summed (`reduction="sum"`) or largest (`"max"`) softmax probability of the targets.
    """

    name = "image_classifier"
    REDUCTIONS = ("sum", "max")

    def __init__(self, model_path: str | Path, target_ids: Sequence[int], reduction: str = "sum",
                 batch_size: int = 32, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        if reduction not in self.REDUCTIONS:
            raise ValueError(f"Unknown reduction {reduction!r}; valid: {list(self.REDUCTIONS)}.")
        folder = local_model_folder(model_path, "image-classifier")
        self.model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True)
        self.model = self.model.to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        num_labels = self.model.config.num_labels
        bad = [i for i in target_ids if not 0 <= int(i) < num_labels]
        if not target_ids or bad:
            raise ValueError(
                f"target_ids must be non-empty class indices in [0, {num_labels}); got {list(target_ids)}."
            )
        self.model_path, self.target_ids = str(model_path), [int(i) for i in target_ids]
        self.reduction, self.batch_size, self.device = reduction, batch_size, device

    @torch.no_grad()
    def _probabilities(self, images: Sequence[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=[rgb(im) for im in images], return_tensors="pt").to(self.device)
        return self.model(**inputs).logits.float().softmax(dim=-1).cpu()  # (B, num_labels)

    def detect(self, images: Sequence[Image.Image]) -> Detection:
        probs = torch.cat([self._probabilities(images[i:i + self.batch_size])
                           for i in range(0, len(images), self.batch_size)])
        target = probs[:, self.target_ids]  # (N, T)
        scores = target.sum(-1) if self.reduction == "sum" else target.max(-1).values
        top1 = probs.argmax(-1).tolist()
        labels = self.model.config.id2label
        details = [{"top1": t, "top1_label": labels.get(t, str(t))} for t in top1]
        return Detection(scores.tolist(), [t in self.target_ids for t in top1], details)

    def describe(self) -> dict[str, Any]:
        labels = self.model.config.id2label
        return {
            "name": self.name, "model": self.model_path, "architecture": self.model.config.architectures,
            "target_ids": self.target_ids, "target_labels": [labels.get(i, str(i)) for i in self.target_ids],
            "reduction": self.reduction, "decision": "top-1 in target_ids",
        }


# --- any concept: CLIP zero-shot -------------------------------------------------------------
@register_detector("clip_zero_shot")
class CLIPZeroShotDetector(Detector):
    """CLIP zero-shot (Radford et al. 2021): softmax over `logit_scale * cos(image, prompt)`.

    Score = probability of `concept_prompt` against `alternative_prompts`; flag = score >= threshold.
    """

    name = "clip_zero_shot"

    def __init__(self, clip_path: str | Path, concept_prompt: str, alternative_prompts: Sequence[str],
                 threshold: float = 0.5, batch_size: int = 32, device: str = "cpu"):
        from stereo.evaluation.clip_score import load_clip

        if not alternative_prompts:
            raise ValueError("alternative_prompts must list at least one prompt to compare against, "
                             "e.g. ['a photo of a dog'] for concept 'a photo of a cat'.")
        self.model, self.processor = load_clip(clip_path, device)
        self.clip_path, self.threshold, self.batch_size = str(clip_path), threshold, batch_size
        self.prompts = [concept_prompt, *alternative_prompts]

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image]) -> Detection:
        from stereo.evaluation.clip_score import clip_embeddings

        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            image_emb, text_emb = clip_embeddings(
                self.model, self.processor, images[start:start + self.batch_size], self.prompts
            )
            logits = self.model.logit_scale.exp() * image_emb @ text_emb.T  # (B, 1 + K)
            scores.extend(logits.softmax(dim=-1)[:, 0].double().cpu().tolist())
        return Detection(scores, [s >= self.threshold for s in scores])

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.clip_path, "concept_prompt": self.prompts[0],
                "alternative_prompts": self.prompts[1:], "threshold": self.threshold}
