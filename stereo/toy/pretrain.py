"""Pretrain every toy model from a seed: detector, CLIP, VAE, UNet -> the committed weights folder.

    python -m stereo.toy.pretrain [--seed 0] [--out stereo/toy/weights] [--steps-scale 1.0]

Stages run in order and each is cached in `~/.cache/stereo/toy_work_seed<seed>_scale<scale>/`
(or `--work`; delete it after changing the code), so a
crashed run resumes where it stopped; the UNet checkpoints every 250 steps and refreshes the
output folder (a usable model + manifest) every `--publish-every` steps.
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPProcessor

from stereo.manifest import git_commit, package_versions, sha256_file, write_json_atomic
from stereo.models.tiny import load_clip_tokenizer
from stereo.toy import TOY_WEIGHTS_DIR
from stereo.toy.clip import clip_retrieval_accuracy, toy_image_processor, train_clip
from stereo.toy.detector import detector_accuracy, load_detector_net, save_detector, train_detector
from stereo.toy.diffusion import (
    encode_posterior,
    text_encoder_from_clip,
    toy_pipeline,
    train_unet,
    train_vae,
    vae_reconstruction_mse,
)
from stereo.toy.scenes import generate_scenes, render_all


@dataclass(frozen=True)
class ToyPretrainConfig:
    """Sizes at --steps-scale 1.0 (about an hour on 2 CPU cores)."""

    seed: int = 0
    steps_scale: float = 1.0
    n_scenes: int = 20000
    n_heldout: int = 2000
    detector_steps: int = 1500
    clip_steps: int = 1000
    vae_steps: int = 3000
    unet_steps: int = 15000
    # one cosine lr cycle (warm-up, then peak -> peak / 10); more lengths give restarts at half the peak
    unet_cycles: tuple[int, ...] = (15000,)
    unet_heads: int = 2
    unet_min_snr_gamma: float | None = 5.0

    def scaled(self) -> dict:
        s = self.steps_scale
        return {
            "n_scenes": max(256, round(self.n_scenes * s)),
            "n_heldout": max(128, round(self.n_heldout * s)),
            **{k: max(1, round(getattr(self, k) * s))
               for k in ("detector_steps", "clip_steps", "vae_steps", "unet_steps")},
            "unet_cycles": [max(1, round(c * s)) for c in self.unet_cycles],
        }


def write_manifest(out: Path, config: ToyPretrainConfig, sizes: dict, metrics: dict, unet_steps_done: int) -> None:
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {
        "command": f"python -m stereo.toy.pretrain --seed {config.seed} --steps-scale {config.steps_scale}",
        "seed": config.seed, "config": asdict(config), "steps": sizes,
        "unet_steps_done": unet_steps_done, "complete": unet_steps_done >= sizes["unet_steps"],
        "metrics": metrics, "versions": {**package_versions(), "numpy": np.__version__}, "git_commit": git_commit(),
        "sha256": {str(p.relative_to(out)): sha256_file(p) for p in files},
    }
    write_json_atomic(out / "manifest.json", manifest)


def run(config: ToyPretrainConfig, out: Path, work: Path, publish_every: int = 500, threads: int = 2) -> dict:
    """All stages; returns the metrics written to the manifest."""
    from diffusers import AutoencoderKL
    from transformers import CLIPModel

    torch.set_num_threads(threads)
    sizes = config.scaled()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict = {}
    clock = time.time()

    def log(msg: str) -> None:
        print(f"[pretrain +{(time.time() - clock) / 60:.1f} min] {msg}", flush=True)

    scenes = generate_scenes(sizes["n_scenes"], config.seed)
    images = render_all(scenes)
    heldout = generate_scenes(sizes["n_heldout"], config.seed + 10_000)
    heldout_images = render_all(heldout)
    log(f"rendered {len(scenes)} training and {len(heldout)} held-out scenes")

    det_path = work / "detector.safetensors"
    if not det_path.exists():
        net = train_detector(scenes, images, sizes["detector_steps"], config.seed)
        save_detector(net, det_path, {"seed": config.seed, "steps": sizes["detector_steps"]})
    net = load_detector_net(det_path)
    metrics["detector_heldout_accuracy"] = detector_accuracy(net, heldout, heldout_images)
    log(f"detector: {metrics['detector_heldout_accuracy']}")

    clip_dir = work / "clip"
    if not (clip_dir / "config.json").exists():
        train_clip(scenes, images, sizes["clip_steps"], config.seed + 1).save_pretrained(clip_dir)
    if not (clip_dir / "processor_config.json").exists():
        # a full CLIPProcessor (image processor + tokenizer), so CLIPProcessor.from_pretrained works
        CLIPProcessor(image_processor=toy_image_processor(), tokenizer=load_clip_tokenizer()).save_pretrained(clip_dir)
    clip = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    metrics["clip_heldout_retrieval_accuracy"] = clip_retrieval_accuracy(clip, heldout, heldout_images)
    log(f"clip retrieval accuracy {metrics['clip_heldout_retrieval_accuracy']:.3f}")

    vae_dir = work / "vae"
    if not (vae_dir / "config.json").exists():
        train_vae(images, sizes["vae_steps"], config.seed + 2).save_pretrained(vae_dir)
    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval().requires_grad_(False)
    metrics["vae_heldout_mse"] = vae_reconstruction_mse(vae, heldout_images)
    metrics["vae_scaling_factor"] = vae.config.scaling_factor
    log(f"vae reconstruction mse {metrics['vae_heldout_mse']:.5f}, scaling factor {vae.config.scaling_factor:.4f}")

    text_encoder = text_encoder_from_clip(clip)
    mean, std = encode_posterior(vae, images)

    def publish(unet, step: int) -> None:
        if step % publish_every and step != sizes["unet_steps"]:
            return
        for name in ("pipeline", "clip"):
            shutil.rmtree(out / name, ignore_errors=True)
        toy_pipeline(vae, text_encoder, unet).save_pretrained(out / "pipeline", safe_serialization=True)
        shutil.copytree(clip_dir, out / "clip")
        shutil.copy(det_path, out / "detector.safetensors")
        shutil.copy(det_path.with_suffix(".json"), out / "detector.json")
        write_manifest(out, config, sizes, metrics, step)
        log(f"published the model at UNet step {step} to {out}")

    train_unet(mean, std, vae.config.scaling_factor, scenes, text_encoder, sizes["unet_steps"],
               config.seed + 3, cycles=sizes["unet_cycles"], min_snr_gamma=config.unet_min_snr_gamma,
               heads=config.unet_heads, checkpoint=work / "unet_checkpoint.pt",
               on_checkpoint=publish)
    log("done")
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=TOY_WEIGHTS_DIR)
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiplies every step count and data size")
    parser.add_argument("--work", type=Path, default=None, help="stage cache (default: ~/.cache/stereo/toy_work_...)")
    parser.add_argument("--publish-every", type=int, default=500, help="UNet steps between refreshes of --out")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (1 is faster when other jobs share the cores)")
    args = parser.parse_args(argv)
    if args.steps_scale <= 0:
        raise SystemExit(f"--steps-scale must be > 0, got {args.steps_scale}")
    work = args.work or Path.home() / ".cache" / "stereo" / f"toy_work_seed{args.seed}_scale{args.steps_scale}"
    config = ToyPretrainConfig(seed=args.seed, steps_scale=args.steps_scale)
    run(config, args.out, work, args.publish_every, args.threads)


if __name__ == "__main__":
    main()
