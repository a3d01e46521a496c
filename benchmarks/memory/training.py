"""One erasure step traced: the x_t chain, the teacher, the student's forward and backward, AdamW;
optionally with DDP's gradient buckets. With method.lora.enabled the student is built by the real
`make_student` (a fp32 copy of the pipeline's UNet + a peft adapter on the subset's layers), the teacher
is that student with its adapter disabled (fp32 weights under autocast, `ErasureTrainer._teacher_eps`),
and `trace_lora_merge` traces folding the adapter in (`stereo.generation.frozen` / `frozen_copy`)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from benchmarks.memory.configs import Setup
from benchmarks.memory.memtrace import round_up, storage_bytes
from benchmarks.memory.trace import Adam, Breakdown, Trace, timesteps
from stereo.erasure.subsets import make_student, select_trainable
from stereo.erasure.trainer import adapters_disabled
from stereo.generation import frozen, frozen_copy

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
        text_encoder, _, base = tr.pipeline()
        width = text_encoder.config.hidden_size
        student, teacher, params = traced_student(tr, s, base)
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
            # a frozen half-precision teacher runs outside autocast; the LoRA student's fp32 base, under it
            lora = teacher is None
            dtype, model = (torch.float32, student) if lora else (s.frozen, teacher)
            base_only = adapters_disabled(student) if lora else contextlib.nullcontext()
            with (tr.tracker.section("teacher"), torch.no_grad(), base_only,
                  tr.cuda.autocast(lora or s.teacher_autocast)):
                del target
                emb = tr.embeddings(conditions * b, width)
                eps = model(x.repeat(conditions, 1, 1, 1).to(dtype), t.repeat(conditions),
                            encoder_hidden_states=emb.to(dtype)).sample.float().view(conditions, b, *x.shape[1:])
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


def traced_student(tr: Trace, setup: Setup, base) -> tuple[torch.nn.Module, object, list[torch.Tensor]]:
    """(student, teacher, trainable parameters) as the real code makes them from the pipeline's UNet `base`.

    Full fine-tuning: a fp32 UNet with the subset unfrozen, taught by `base`. LoRA: the real
    `make_student` (deepcopy + .float() + peft's add_adapter on the subset's layers), teacher None.
    """
    if not setup.lora_enabled:
        student = tr.module("student UNet (fp32)", tr.unet_fn, torch.float32, frozen=False)
        names = set(select_trainable(student, setup.subset))
        return student, base, [p for n, p in student.named_parameters() if n in names]
    student, teacher, names = make_student(base, setup.subset, setup.lora)
    assert teacher is None, "make_student with LoRA returns no teacher"
    names = set(names)
    params = [p for n, p in student.named_parameters() if n in names]
    adapter = storage_bytes(params)
    tr.resident["student UNet (fp32, frozen base of the adapter)"] = storage_bytes(
        [t for t in (*student.parameters(), *student.buffers()) if not any(t is p for p in params)])
    tr.resident[f"LoRA adapter (rank {setup.lora_rank}, fp32)"] = adapter
    tr.modules.append(student)
    return student, None, params


MERGE_SECTIONS = {"erased": "fold the adapter in: frozen(student)",
                  "copy": "fold in + model.dtype copy: frozen_copy(student)"}


def trace_lora_merge(setup: Setup) -> tuple[dict[str, Breakdown], dict]:
    """Folding a trained LoRA adapter into a plain UNet (`stereo.export.merged_unet`, the real code):
    `frozen(student)` ends every STE erase (the erased UNet the attack and the next round use, fp32);
    `frozen_copy(student, model.dtype)` makes REO's sample / generation copy. The trainer is closed
    by then (AdamW state and grads released): the pipeline and the LoRA student are resident."""
    if not setup.lora_enabled:
        raise ValueError("trace_lora_merge needs method.lora.enabled=true")
    with Trace(setup) as tr:
        _, _, base = tr.pipeline()
        student, _, _ = traced_student(tr, setup, base)
        student.eval()
        tr.tracker.reset_peak()
        sections = {}
        with tr.tracker.section(MERGE_SECTIONS["erased"]):
            plain = frozen(student)
        resident = {**tr.resident, "merged plain UNet (fp32)": storage_bytes([*plain.parameters(), *plain.buffers()])}
        tr.modules.append(plain)  # the merged UNet counts as weights at the peak (it is there at the end)
        sections[MERGE_SECTIONS["erased"]] = tr.breakdown(MERGE_SECTIONS["erased"])
        tr.modules.remove(plain)
        del plain
        with tr.tracker.section(MERGE_SECTIONS["copy"]):
            copy = frozen_copy(student, setup.frozen, "meta")
        tr.modules.append(copy)
        sections[MERGE_SECTIONS["copy"]] = tr.breakdown(MERGE_SECTIONS["copy"])
        tr.modules.remove(copy)
        del copy
        return sections, resident


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
