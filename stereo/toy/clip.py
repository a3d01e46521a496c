"""A tiny CLIP for the toy world, in transformers' `CLIPModel` format.

Text tower: the truncated CLIP BPE of `stereo.models.tiny` (8,192 tokens, 77 positions).
Vision tower: a ViT on 32x32 images with 4x4 patches. Trained contrastively (Radford et al.
2021, InfoNCE in both directions) on (scene, caption) pairs. Because a caption such as
"a circle" describes many scenes, every caption that truly describes an image counts as a
positive for it (multi-positive InfoNCE), not only the caption drawn with it.

Its text tower is the frozen text encoder of the toy diffusion model (as SD uses CLIP's), its
vision tower gives the toy FID features and, with the text tower, a toy CLIP score.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from stereo.conditioning import prompt_ids
from stereo.models.tiny import BOS_ID, EOS_ID, load_clip_tokenizer
from stereo.toy.detector import PAIRS, to_tensor
from stereo.toy.fit import one_cycle_fit
from stereo.toy.scenes import BACKGROUNDS, IMAGE_SIZE, SHAPES, Scene, parse_prompt

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation, kept for familiarity
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def toy_clip_config(width: int = 64) -> CLIPConfig:
    text = dict(vocab_size=8192, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=BOS_ID,
                eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    vision = dict(image_size=IMAGE_SIZE, patch_size=4, num_channels=3, hidden_size=width,
                  intermediate_size=2 * width, num_hidden_layers=3, num_attention_heads=2)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=width)


def toy_image_processor() -> CLIPImageProcessor:
    """Pre-processing matching `pixel_values`: 32x32, CLIP mean/std (saved beside the model)."""
    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def pixel_values(images) -> torch.Tensor:
    """PIL images or a (N, 32, 32, 3) uint8 array -> normalised (N, 3, 32, 32) CLIP input."""
    x = to_tensor(images)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return (x - mean) / std


def tokenize(captions: Sequence[str]) -> torch.Tensor:
    """(N, 77) input ids of the toy's tokenizer, padded with <|endoftext|> exactly as the SD pipeline pads prompts."""
    return prompt_ids(load_clip_tokenizer(), captions)


def image_embeds(model: CLIPModel, pixels: torch.Tensor) -> torch.Tensor:
    return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)


def text_embeds(model: CLIPModel, input_ids: torch.Tensor) -> torch.Tensor:
    return model.text_projection(model.text_model(input_ids=input_ids).pooler_output)


def _concept_vector(shapes, pairs, background) -> np.ndarray:
    """Multi-hot over (5 shapes, 25 colour-shape pairs, 3 backgrounds)."""
    v = np.zeros(len(SHAPES) + len(PAIRS) + len(BACKGROUNDS), np.float32)
    for s in shapes:
        v[SHAPES.index(s)] = 1
    for p in pairs:
        v[len(SHAPES) + PAIRS.index(p)] = 1
    if background:
        v[len(SHAPES) + len(PAIRS) + BACKGROUNDS.index(background)] = 1
    return v


def scene_vectors(scenes: Sequence[Scene]) -> torch.Tensor:
    return torch.from_numpy(np.stack([
        _concept_vector([o.shape for o in s.objects], [f"{o.colour} {o.shape}" for o in s.objects], s.background)
        for s in scenes
    ]))


def caption_vectors(captions: Sequence[str]) -> torch.Tensor:
    parsed = [parse_prompt(c) for c in captions]
    return torch.from_numpy(np.stack([
        _concept_vector(p["shapes"], [f"{c} {s}" for s, c in p["colours"].items()], p["background"])
        for p in parsed
    ]))


def describes(caption_vecs: torch.Tensor, scene_vecs: torch.Tensor) -> torch.Tensor:
    """(C, S) bool: caption names exactly the scene's shapes and only facts true of the scene."""
    n = len(SHAPES)
    missing_fact = caption_vecs @ (1 - scene_vecs).T  # facts the caption claims but the scene lacks
    missing_shape = (1 - caption_vecs[:, :n]) @ scene_vecs[:, :n].T  # scene shapes the caption omits
    return (missing_fact == 0) & (missing_shape == 0)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, positives: torch.Tensor,
                     scale: torch.Tensor) -> torch.Tensor:
    """Multi-positive symmetric InfoNCE: -log sum_{j positive} softmax(scale * cos)_ij, both directions.

    img: (B, D), txt: (C, D), positives: (B, C) bool with at least one True per row and column.
    """
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T  # (B, C)
    neg_inf = torch.finfo(logits.dtype).min
    pos = logits.masked_fill(~positives, neg_inf)
    i2t = torch.logsumexp(logits, 1) - torch.logsumexp(pos, 1)
    t2i = torch.logsumexp(logits, 0) - torch.logsumexp(pos, 0)
    return (i2t.mean() + t2i.mean()) / 2


def train_clip(scenes: Sequence[Scene], images: np.ndarray, steps: int, seed: int, batch_size: int = 128,
               lr: float = 2e-3, log_every: int = 100) -> CLIPModel:
    """Contrastive training on (image, caption) pairs; the caption of each step is its scene's own."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = CLIPModel(toy_clip_config())
    captions = sorted({s.caption for s in scenes})
    caption_index = {c: i for i, c in enumerate(captions)}
    ids = tokenize(captions)
    cap_vecs, img_vecs = caption_vectors(captions), scene_vectors(scenes)
    scene_caption = torch.tensor([caption_index[s.caption] for s in scenes])
    pixels = pixel_values(images)

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(len(scenes), (batch_size,), generator=generator)
        cap = torch.unique(scene_caption[idx])  # (C,) distinct captions of the batch
        positives = describes(cap_vecs[cap], img_vecs[idx]).T  # (B, C)
        return contrastive_loss(image_embeds(model, pixels[idx]), text_embeds(model, ids[cap]), positives,
                                model.logit_scale.exp().clamp(max=100))

    model.train()
    one_cycle_fit(model.parameters(), steps, lr, batch_loss, name="clip", weight_decay=0.05, log_every=log_every)
    return model.eval()


@torch.no_grad()
def clip_retrieval_accuracy(model: CLIPModel, scenes: Sequence[Scene], images: np.ndarray) -> float:
    """Share of images whose best caption, among all captions of the set, truly describes them."""
    captions = sorted({s.caption for s in scenes})
    txt = F.normalize(text_embeds(model, tokenize(captions)), dim=-1)
    img = F.normalize(image_embeds(model, pixel_values(images)), dim=-1)
    best = (img @ txt.T).argmax(1)
    ok = describes(caption_vectors(captions), scene_vectors(scenes)).T  # (N, C)
    return ok[torch.arange(len(scenes)), best].float().mean().item()


@torch.no_grad()
def toy_fid_features(images, model: CLIPModel | None = None, batch_size: int = 256) -> torch.Tensor:
    """(N, 64) toy-CLIP image features (pooled vision output, before projection), the toy FID space.

    images: PIL images or a (N, 32, 32, 3) uint8 array; `model` defaults to the committed toy CLIP.
    """
    if model is None:
        from stereo.toy import load_toy_clip

        model = load_toy_clip()
    pixels = pixel_values(images)
    feats = [model.vision_model(pixel_values=pixels[i:i + batch_size]).pooler_output
             for i in range(0, len(pixels), batch_size)]
    return torch.cat(feats) if feats else torch.zeros(0, model.config.vision_config.hidden_size)
