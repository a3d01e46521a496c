"""Evaluation speed: images/s of evaluation generation and steps/s of each attack, stereo's batched
paths vs a plain loop (one prompt at a time, fp32), measured in the same run and printed as ratios.

  python -m benchmarks.eval_speed --model tiny --prompts 8 --steps 10 --threads 1
  python -m benchmarks.eval_speed --model sd14-random --dtype fp16 --prompts 16 --batch 8   # GPU

Generation: `stereo.attacks.base.render` (batched, `--dtype`) vs `pipe(prompt)` per prompt in fp32.
Attacks: UnlearnDiffAtk and Ring-A-Bell optimise `--prompts` prompts together vs one at a time
(prompt-steps/s: optimisation steps × prompts / s); the token attacks learn one token, so they
compare `--dtype` with fp32. Success checks (UnlearnDiffAtk) are off so only optimisation is timed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from benchmarks import harness

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def load(model: str, dtype: str):
    return harness.load(model, dtype, DEVICE)


def timed(fn) -> float:
    return harness.timed(fn, DEVICE, warm_up=False)


def generation_speed(args, prompts) -> tuple[float, float]:
    """(images/s batched in --dtype, images/s one prompt at a time in fp32)."""
    from stereo.attacks.base import GenerationSettings, render

    fast, plain = load(args.model, args.dtype), load(args.model, "fp32")
    settings = GenerationSettings(args.steps, args.batch)
    render(fast, prompts[:1], settings)  # warm-up, both pipelines
    plain(prompts[0].text, num_inference_steps=1)
    ours = timed(lambda: render(fast, prompts, settings))

    def loop():
        for p in prompts:
            generator = torch.Generator("cpu").manual_seed(p.seed)
            plain(p.text, num_inference_steps=args.steps, guidance_scale=p.guidance, generator=generator)

    reference = timed(loop)
    return len(prompts) / ours, len(prompts) / reference


def attack_speed(args, name: str, eval_prompts, concept, work: Path) -> tuple[float, float, str]:
    """(rate ours, rate reference, unit) for one attack."""
    from stereo.attacks.base import AttackTarget, GenerationSettings, build_attack, gallery_latents
    from stereo.evaluation.config import attack_config

    gallery = dict(gallery_size=4, gallery_steps=args.steps)
    budgets = {"concept_inversion": gallery, "soft_prompt": gallery,
               "unlearndiffatk": dict(**gallery, check_success=False, project_every=max(1, args.attack_steps // 2)),
               "ring_a_bell": dict(population=16, elite=4, prompt_length=8)}
    common = dict(steps=args.attack_steps, **budgets[name])

    def batched(prompt_batch: int) -> dict:  # prompts optimised together (the token attacks learn one token)
        return {"prompt_batch": prompt_batch} if name in ("unlearndiffatk", "ring_a_bell") else {}

    def run(dtype: str, prompt_batch: int, tag: str) -> float:
        pipe = load(args.model, dtype)
        target = AttackTarget(pipe, pipe, concept, work / tag, work / "gallery",
                              generation=GenerationSettings(args.steps, args.batch), progress=False)
        attack = build_attack(attack_config(name, **common, **batched(prompt_batch)))
        if name != "ring_a_bell":  # black-box: no gallery
            gallery_latents(target, attack.settings)  # generated and cached outside the timing
        warm_up = build_attack(attack_config(name, **{**common, "steps": 1}, **batched(prompt_batch)))
        if name in ("concept_inversion", "soft_prompt"):
            warm_up.prepare(AttackTarget(**{**vars(target), "out_dir": work / f"{tag}-warm-up"}))
            return args.attack_steps / timed(lambda: attack.prepare(target))
        warm_up.attack(target, eval_prompts[:prompt_batch])
        return args.attack_steps * len(eval_prompts) / timed(lambda: attack.attack(target, eval_prompts))

    if name in ("concept_inversion", "soft_prompt"):
        return run(args.dtype, 1, f"{name}-ours"), run("fp32", 1, f"{name}-ref"), "steps/s"
    return (run(args.dtype, len(eval_prompts), f"{name}-ours"), run("fp32", 1, f"{name}-ref"), "prompt-steps/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | sd14-random | toy")
    parser.add_argument("--dtype", default="fp32", help="fp32 | fp16 | bf16 (ours; the reference is always fp32)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per image")
    parser.add_argument("--batch", type=int, default=8, help="images per generation batch")
    parser.add_argument("--attack-steps", type=int, default=6)
    parser.add_argument("--attacks", default="concept_inversion,soft_prompt,unlearndiffatk,ring_a_bell")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from stereo.attacks.base import AttackedPrompt, EvalPrompt
    from stereo.config import ConceptConfig

    texts = [f"a {c} circle on a plain background" for c in ("red", "blue", "green", "yellow", "purple")]
    eval_prompts = [EvalPrompt(i, texts[i % len(texts)], 1000 + i, 7.5) for i in range(args.prompts)]
    attacked = [AttackedPrompt.of(p, p.prompt) for p in eval_prompts]
    concept = ConceptConfig(name="circle", prompts=["circle"], gallery_prompts=["a red circle"],
                            initializer_token="shape")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model={args.model} dtype={args.dtype} prompts={args.prompts} steps={args.steps} batch={args.batch} "
          f"on {device}")
    ours, reference = generation_speed(args, attacked)
    print(f"generation        {ours:8.2f} images/s   plain loop {reference:8.2f} images/s   "
          f"ratio {ours / reference:.2f}x")
    with tempfile.TemporaryDirectory() as work:
        for name in args.attacks.split(","):
            ours, reference, unit = attack_speed(args, name, eval_prompts, concept, Path(work))
            print(f"{name:17s} {ours:8.2f} {unit}   plain loop {reference:8.2f} {unit}   ratio {ours / reference:.2f}x")


if __name__ == "__main__":
    main()
