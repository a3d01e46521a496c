"""Peak GPU memory of every STEREO phase on SD 1.4 (512 px, `trainer=gpu`), SD 2.1 or SDXL, estimated on a CPU.

Each phase's real code path (the UNet, text encoder and VAE of `model=sd14-random`, built from
stereo/models/configs/sd14; AdamW; gradient checkpointing) runs forward and backward on meta
tensors (`memtrace`): no weights, no GPU, seconds. What is counted is what
torch.cuda.max_memory_allocated counts (tensor storages in 512-byte blocks), not the CUDA
context (~0.5 GiB) or the caching allocator's reserve, which come on top on a real card.

What is resident in each phase follows the issue-11 design (all frozen parts in model.dtype):
- ESD-u: pipeline (text encoder, VAE, base UNet = the teacher) + fp32 student (noxattn trainable)
  + its grads + AdamW (fused) + one step: the x_t chain (student, no grad, CFG on 2B latents),
  the teacher's batched no-grad forward on M×B latents, the student's forward+backward on B
  latents (bf16 autocast, gradient checkpointing), the optimiser step.
- DDP ESD-u per GPU: the same + DDP's gradient buckets (views of the grads, or a second copy).
- STE round k: teacher = round k-1's erased UNet (fp32: STE keeps the erased student's own weights, an
  extra UNet for k >= 1), earlier rounds released; then its attack (concept inversion through the
  fp32 erased UNet, checkpointing still on since the erased UNet is the former student) with rounds
  k-1 and k's fp32 UNets resident. The attack step is traced with bf16 weights; its activations are
  counted once more for fp32.
- REO after K rounds: teacher batch (1 + anchors + negatives) × B, negatives = prompts + K tokens.
- Evaluation (an erased model with the base pipeline beside it): each attack's step and generation.
"Before" rows show the code of the issue: foreach AdamW (a full fp32 temporary of the trainable
parameters), the accelerator keeping every round's UNet and AdamW state, DDP buckets as copies.

  python -m benchmarks.memory                              # SD 1.4, writes results/memory_sd14.{md,json}
  python -m benchmarks.memory --json -                     # per-phase estimate as JSON on stdout
  python -m benchmarks.memory --model tiny --out /tmp/m    # the same phases on the tiny model (tests)
  python -m benchmarks.memory --model sdxl-random          # SDXL's real shapes, 1024 px (sd21-random: 2.1, 768 px)
  python -m benchmarks.memory --model sdxl-random method.subset=xattn   # config overrides -> memory_sdxl-random_<...>
  python -m benchmarks.memory --model sdxl-random method.lora.enabled=true method.lora.rank=64   # LoRA (below)

With method.lora.enabled=true the student is the real `make_student`'s (fp32 copy + peft adapter on the
subset's layers; the teacher is that student with its adapter disabled, no teacher UNet), and the phases
follow what the LoRA code keeps: STE rounds end by folding the adapter into a new plain fp32 UNet
(`merged_unet`, traced), which the attack then uses without gradient checkpointing; ESD and REO end with the
export and sample copies (merged_unet, frozen_copy). No "before" rows with LoRA.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.memory.configs import read_setup
from benchmarks.memory.phases import estimate
from benchmarks.memory.report import estimates_json, table, write_results

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd14-random", choices=["sd14-random", "sd21-random", "sdxl-random", "tiny"])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for memory_<model>.{md,json}")
    parser.add_argument("--json", metavar="PATH", help="also write the per-phase estimate as JSON ('-': stdout)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("overrides", nargs="*", help="train.py config overrides, e.g. method.subset=xattn")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    setup = read_setup(args.model, overrides=tuple(args.overrides))
    log = (lambda *_: None) if args.json == "-" else print
    phases = estimate(setup, log=log)
    seconds = time.perf_counter() - began
    if args.json == "-":
        json.dump(estimates_json(phases, setup), sys.stdout, indent=1)
        return 0
    print(table(phases))
    if args.json:
        Path(args.json).write_text(json.dumps(estimates_json(phases, setup), indent=1))
    if not args.no_write:
        print(f"wrote {write_results(phases, setup, args.out, seconds, args.overrides)}.{{md,json}}")
    return 0
