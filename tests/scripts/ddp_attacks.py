"""Two processes share a concept gallery, a concept inversion, the evaluation attacks' `prepare` and the
FID reference features (run by tests/test_inversion.py with `torchrun --nproc_per_node 2` on CPU/gloo).
Each rank writes rank<r>.json into the folder given."""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image

from stereo.attacks import gallery as gallery_module
from stereo.attacks.base import AttackTarget, GenerationSettings, build_attack
from stereo.attacks.gallery import concept_gallery, encode_images
from stereo.attacks.inversion import InversionSettings, learn_token
from stereo.config import ConceptConfig
from stereo.evaluation.config import attack_config
from stereo.evaluation.fid import reference_stats
from stereo.models.tiny import tiny_pipeline

GALLERY = dict(prompts=["a photo of a church", "a church tower"], n=5, steps=2, batch_size=2)
SETTINGS = InversionSettings(steps=3, lr=5e-2, batch_size=1)
ATTACK = dict(steps=2, gallery_size=3, gallery_steps=2)
CONCEPT = ConceptConfig(name="circle", prompts=["circle"], kind="object", initializer_token="shape",
                        gallery_prompts=["a red circle"])


class MeanColour:
    """A feature extractor that counts the images it sees."""

    name = "mean-colour"

    def __init__(self):
        self.seen = 0

    def __call__(self, images):
        self.seen += len(images)
        return np.stack([np.asarray(image, dtype=np.float64).mean(axis=(0, 1)) for image in images])


def reference_images(folder: Path) -> list[Path]:
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(7):
        path = folder / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def pixels_hash(images) -> str:
    return hashlib.sha256(b"".join(image.tobytes() for image in images)).hexdigest()


def main(out: Path) -> None:
    torch.set_num_threads(1)
    state = PartialState(cpu=True)
    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    asked: list[int] = []  # seeds this rank generated
    generate = gallery_module.generate

    def spy(pipe, prompts, seeds, **kwargs):
        asked.extend(seeds)
        return generate(pipe, prompts, seeds, **kwargs)

    gallery_module.generate = spy
    images = concept_gallery(pipe, cache_dir=out / "gallery", accelerator=state, **GALLERY)
    latents = encode_images(pipe, images)
    learned = learn_token(pipe, latents, "<x>", "church", SETTINGS, progress=False, accelerator=state)
    alone = learn_token(tiny_pipeline(seed=0), latents, "<x>", "church", SETTINGS, progress=False)
    report = {"num_processes": state.num_processes, "asked": list(asked), "gallery": pixels_hash(images),
              "vectors": learned.vectors.tolist(), "losses": learned.losses, "alone": alone.vectors.tolist()}
    for name in ("concept_inversion", "unlearndiffatk"):  # evaluation's prepare, on every process
        asked.clear()
        target = AttackTarget(pipe, pipe, CONCEPT, out / "attacks" / name, out / f"gallery-{name}",
                              generation=GenerationSettings(2, 2), progress=False, accelerator=state)
        attack = build_attack(attack_config(name, **ATTACK))
        attack.prepare(target)
        report[name] = {"asked": list(asked), "token": getattr(attack, "token", None)}
        if name == "concept_inversion":
            ids = pipe.tokenizer.convert_tokens_to_ids([attack.token])
            report[name]["vectors"] = pipe.text_encoder.get_input_embeddings().weight[ids].tolist()
    extractor = MeanColour()
    stats = reference_stats(reference_images(out / f"reference{state.process_index}"), extractor,
                            out / "fid_cache", accelerator=state)
    report["fid"] = {"seen": extractor.seen, "mean": stats.mean.tolist(), "cov": stats.cov.tolist()}
    (out / f"rank{state.process_index}.json").write_text(json.dumps(report))
    state.wait_for_everyone()
    state.destroy_process_group()  # a gloo group left to the interpreter's exit can abort the process


if __name__ == "__main__":
    main(Path(sys.argv[1]))
