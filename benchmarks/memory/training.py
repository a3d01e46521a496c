"""One erasure step traced: the x_t chain, the teacher, the student's forward and backward, AdamW;
optionally with DDP's gradient buckets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.memory.configs import Setup
from benchmarks.memory.memtrace import round_up
from benchmarks.memory.trace import Adam, Breakdown, Trace, timesteps
from stereo.erasure.subsets import select_trainable

OPT_SECTIONS = {"fused": "AdamW step (fused)", "foreach": "AdamW step (foreach)"}

ERASURE_PARTS = ("x_t chain", "teacher", "student forward+backward", "optimizer")


def trace_erasure(setup: Setup, conditions: int, ddp: str | None = None,
                  parts: tuple[str, ...] = ERASURE_PARTS) -> tuple[dict[str, Breakdown], dict, int]:
    """One erasure step (ESD: conditions=2; REO: 1 + anchors + negatives); sections, resident, trainable bytes.

    ddp: None (one process), "view" (gradient_as_bucket_view=True: grads live in the buckets) or
    "copy" (buckets are a second copy of the grads). `parts` not traced still leave their outputs
    (x_t, the target) behind, so the traced parts start from the state they have in a full step.
    """
    b, s = setup.batch, setup
    with Trace(setup) as tr:
        text_encoder, _, teacher = tr.pipeline()
        width = text_encoder.config.hidden_size
        student = tr.module("student UNet (fp32)", tr.unet_fn, torch.float32, frozen=False)
        names = set(select_trainable(student, s.subset))
        params = [p for n, p in student.named_parameters() if n in names]
        if s.gradient_checkpointing:
            student.enable_gradient_checkpointing(gradient_checkpointing_func=tr.cuda.checkpoint)
        adamw = Adam(params)
        buckets = _buckets(params) if ddp else []
        if ddp == "view":
            _grads_into(params, buckets)
        tr.tracker.reset_peak()
        x, t, cond, uncond = tr.latents(b), timesteps(b), tr.embeddings(b, width), tr.embeddings(1, width)
        if "x_t chain" in parts:
            with tr.tracker.section("x_t chain"), torch.no_grad(), tr.cuda.autocast():
                eps = student(torch.cat([x, x]), timesteps(2 * b),
                              encoder_hidden_states=torch.cat([uncond.expand(b, -1, -1), cond])).sample.float()
                eps = eps[:b] + 3.0 * (eps[b:] - eps[:b])  # classifier-free guidance
                x = x - 0.1 * eps  # DDIM update: a few latent-sized temporaries
                del eps
        target = torch.empty_like(x)
        if "teacher" in parts:
            with tr.tracker.section("teacher"), torch.no_grad(), tr.cuda.autocast(s.teacher_autocast):
                del target
                emb = tr.embeddings(conditions * b, width)
                eps = teacher(x.repeat(conditions, 1, 1, 1).to(s.frozen), t.repeat(conditions),
                              encoder_hidden_states=emb.to(s.frozen)).sample.float().view(conditions, b, *x.shape[1:])
                target = eps[0] - (eps[1:] - eps[0]).mean(0)  # ESD / REO: uncond and condition differences
                del eps, emb
        if "student forward+backward" in parts:
            with tr.tracker.section("student forward+backward"):
                student.train()
                with tr.cuda.autocast():
                    eps = student(x, t, encoder_hidden_states=cond).sample
                loss = F.mse_loss(eps.float(), target.float())
                loss.backward()
                del eps, loss
        if "optimizer" in parts:
            for kernel, section in OPT_SECTIONS.items():
                with tr.tracker.section(section):
                    adamw.step(kernel)
        grads = [] if ddp == "view" else [p.grad for p in params if p.grad is not None]  # views: grads = buckets
        sections = {name: tr.breakdown(name, grads, adamw.tensors(), buckets) for name in tr.tracker.sections}
        trainable = sum(round_up(p.numel() * 4) for p in params)
        return sections, dict(tr.resident), trainable


def _buckets(params: list[torch.Tensor], cap_bytes: int = 25 * 2**20) -> list[torch.Tensor]:
    """DDP's gradient buckets: flat fp32 tensors of about `bucket_cap_mb` (25 MiB) each, together all grads."""
    sizes, current = [], 0
    for p in reversed(params):  # DDP fills buckets in reverse parameter order
        current += p.numel()
        if current * 4 >= cap_bytes:
            sizes.append(current)
            current = 0
    sizes += [current] if current else []
    return [torch.empty(n, dtype=torch.float32) for n in sizes]


def _grads_into(params: list[torch.Tensor], buckets: list[torch.Tensor]) -> None:
    """gradient_as_bucket_view=True: every grad is a view of its bucket (backward accumulates in place)."""
    flat = iter(reversed(params))
    for bucket in buckets:
        offset = 0
        while offset < bucket.numel():
            p = next(flat)
            p.grad = bucket[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
