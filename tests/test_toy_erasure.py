"""STEREO on the committed toy model erases its concept and keeps a non-target one.

The toy detector reads a small sample of images before and after erasure. Bounds are loose
(8 images per prompt) but the effect is large: measured with these settings, circle prompts
fall from 100% to 8% while triangle prompts stay at 100%.
"""

import torch
from diffusers import UNet2DConditionModel

from stereo.config import compose
from stereo.generation import generate
from stereo.recipes import train
from stereo.toy import load_toy_detector, load_toy_pipeline

CONCEPT_PROMPTS = ["a circle", "a red circle", "a blue circle on a striped background"]
OTHER_PROMPTS = ["a triangle", "a green triangle", "a triangle on a dotted background"]
N = 8


def detection_rate(pipe, prompts: list[str], concept: str) -> float:
    images = generate(pipe, [p for p in prompts for _ in range(N)], list(range(N * len(prompts))), steps=25,
                      guidance=4.0, batch_size=N * len(prompts))
    return load_toy_detector(concept).detect(images).rate()


def test_stereo_on_the_toy_erases_the_concept_and_keeps_another(tmp_path):
    # the default `python train.py` job (STEREO, concept circle, conf/budget/toy.yaml), one STE round
    cfg = compose(["model=toy", "method=stereo", "concept=circle", "method.ste.rounds=1",
                   "method.ste.inversion.steps=100", f"output_dir={tmp_path}"])
    out = train(cfg)
    pipe = load_toy_pipeline()
    pipe.set_progress_bar_config(disable=True)
    base = {"circle": detection_rate(pipe, CONCEPT_PROMPTS, "circle"),
            "triangle": detection_rate(pipe, OTHER_PROMPTS, "triangle")}
    pipe.unet = UNet2DConditionModel.from_pretrained(out["export_dir"] / "unet").eval()
    with torch.no_grad():
        erased = {"circle": detection_rate(pipe, CONCEPT_PROMPTS, "circle"),
                  "triangle": detection_rate(pipe, OTHER_PROMPTS, "triangle")}
    print(f"detection rates: base {base}, after STEREO {erased}")
    assert base["circle"] >= 0.9 and base["triangle"] >= 0.8, base
    assert erased["circle"] <= base["circle"] - 0.5, (base, erased)
    assert erased["triangle"] >= 0.75, (base, erased)
