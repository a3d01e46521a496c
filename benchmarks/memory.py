"""Peak GPU memory of every STEREO phase on SD 1.4 (512 px, `trainer=gpu`), estimated on a CPU.

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

  python benchmarks/memory.py                              # SD 1.4, writes results/memory_sd14.{md,json}
  python benchmarks/memory.py --json -                     # per-phase estimate as JSON on stdout
  python benchmarks/memory.py --model tiny --out /tmp/m    # the same phases on the tiny model (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import memtrace
import torch
import torch.nn.functional as F
from memtrace import GIB, CudaSemantics, MemoryTracker, meta_module, module_tensors, round_up
from omegaconf import OmegaConf
from torch.optim.adam import adam

from stereo.attacks.unlearndiffatk import project_to_simplex, soft_prefix
from stereo.config import CONF_DIR, compose, erased_subset
from stereo.erasure.subsets import select_trainable
from stereo.evaluation.config import EvalGenerationConfig
from stereo.models.loading import SD14_CONFIGS, torch_dtype

RESULTS = Path(__file__).resolve().parent / "results"
TEXT_LEN = 77
OPT_SECTIONS = {"fused": "AdamW step (fused)", "foreach": "AdamW step (foreach)"}
BARS_GIB = {"esd": 18.0, "ddp": 18.0, "ste": 20.0, "reo": 20.0}


# ----------------------------------------------------------------------------------------------
# Models and settings
# ----------------------------------------------------------------------------------------------
def _sd14_config(name: str) -> dict:
    config = json.loads((SD14_CONFIGS / name).read_text())
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}


def _builders(model: str):
    """(unet, text_encoder, vae) constructors of a model kind, for the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if model == "sd14-random":
        return (lambda: UNet2DConditionModel.from_config(_sd14_config("unet.json")),
                lambda: CLIPTextModel(CLIPTextConfig(**_sd14_config("text_encoder.json"))),
                lambda: AutoencoderKL.from_config(_sd14_config("vae.json")))
    if model == "tiny":
        from stereo.models.tiny import tiny_text_encoder, tiny_unet, tiny_vae

        return tiny_unet, tiny_text_encoder, tiny_vae
    raise ValueError(f"--model {model!r} is not valid; choose sd14-random or tiny")


@dataclass(frozen=True)
class Setup:
    """Everything the estimate depends on, read from the real configs (`model=<m> trainer=gpu method=stereo`)."""

    model: str
    resolution: int
    frozen_dtype: str
    batch: int
    gradient_checkpointing: bool
    subset: str
    concept_prompts: int
    rounds: int
    inversion_batch: int
    anchors_per_step: int
    gallery_size: int
    eval_inversion_batch: int
    eval_soft_prompt_batch: int
    uda_prompt_batch: int
    uda_prefix_tokens: int
    rab_population: int
    rab_prompt_batch: int
    generation_batch: int
    teacher_autocast: bool = False  # the plan: the bf16 teacher runs outside autocast

    @property
    def frozen(self) -> torch.dtype:
        return torch_dtype(self.frozen_dtype)


def read_setup(model: str, concept: str = "nudity", overrides: tuple[str, ...] = ()) -> Setup:
    cfg = compose([f"model={model}", "trainer=gpu", "method=stereo", f"concept={concept}",
                   "model.dtype=bf16", *overrides])
    attack = {name: OmegaConf.load(CONF_DIR / "attack" / f"{name}.yaml")
              for name in ("concept_inversion", "soft_prompt", "unlearndiffatk", "ring_a_bell")}
    ste, reo = cfg.method.ste, cfg.method.reo
    return Setup(
        model=model, resolution=cfg.model.resolution, frozen_dtype=cfg.model.dtype, batch=cfg.trainer.batch_size,
        gradient_checkpointing=cfg.trainer.gradient_checkpointing, subset=erased_subset(cfg),
        concept_prompts=sum(len(c.prompts) for c in cfg.concepts.values()), rounds=ste.rounds,
        inversion_batch=ste.inversion.batch_size, anchors_per_step=reo.anchors_per_step,
        gallery_size=ste.gallery_size, eval_inversion_batch=attack["concept_inversion"].batch_size,
        eval_soft_prompt_batch=attack["soft_prompt"].batch_size,
        uda_prompt_batch=attack["unlearndiffatk"].prompt_batch,
        uda_prefix_tokens=attack["unlearndiffatk"].prefix_tokens,
        rab_population=attack["ring_a_bell"].population, rab_prompt_batch=attack["ring_a_bell"].prompt_batch,
        generation_batch=EvalGenerationConfig().batch_size,
    )


# ----------------------------------------------------------------------------------------------
# Breakdown of a peak
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Breakdown:
    """Bytes at a peak: persistent parts + everything else (activations, temporaries, autocast casts)."""

    total: int
    weights: int = 0
    grads: int = 0
    optimizer: int = 0
    buckets: int = 0

    @property
    def activations(self) -> int:
        return self.total - self.weights - self.grads - self.optimizer - self.buckets

    def plus(self, weights: int = 0, optimizer: int = 0, buckets: int = 0) -> "Breakdown":
        """The same program with more persistent tensors resident (a constant offset at every instant)."""
        return replace(self, total=self.total + weights + optimizer + buckets, weights=self.weights + weights,
                       optimizer=self.optimizer + optimizer, buckets=self.buckets + buckets)


@dataclass
class Phase:
    name: str
    sections: dict[str, Breakdown]
    resident: dict[str, int]
    bar_gib: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak_section(self) -> str:
        return max(self.sections, key=lambda s: self.sections[s].total)

    @property
    def peak(self) -> Breakdown:
        return self.sections[self.peak_section]

    @property
    def met(self) -> bool | None:
        return None if self.bar_gib is None else self.peak.total <= self.bar_gib * GIB

    def with_resident(self, name: str, weights: int = 0, optimizer: int = 0, note: str | None = None) -> "Phase":
        if not weights and not optimizer:
            return self
        sections = {k: b.plus(weights, optimizer) for k, b in self.sections.items()}
        notes = self.notes + ([note] if note else [])
        return Phase(self.name, sections, {**self.resident, name: weights + optimizer}, self.bar_gib, notes)

    def renamed(self, name: str, bar_gib: float | None = None, drop: tuple[str, ...] = ()) -> "Phase":
        sections = {k: b for k, b in self.sections.items() if k not in drop}
        return Phase(name, sections, dict(self.resident), bar_gib, list(self.notes))

    def as_dict(self) -> dict:
        peak = self.peak
        return {
            "phase": self.name, "peak_bytes": peak.total, "peak_gib": peak.total / GIB,
            "peak_section": self.peak_section,
            "weights_bytes": peak.weights, "grads_bytes": peak.grads, "optimizer_bytes": peak.optimizer,
            "ddp_buckets_bytes": peak.buckets, "activations_bytes": peak.activations,
            "bar_gib": self.bar_gib, "met": self.met, "resident_bytes": self.resident,
            "sections": {k: {**asdict(b), "activations": b.activations} for k, b in self.sections.items()},
            "notes": self.notes,
        }


# ----------------------------------------------------------------------------------------------
# Tracing
# ----------------------------------------------------------------------------------------------
class Trace(contextlib.ExitStack):
    """Meta tensors by default + the byte tracker + CUDA allocation behaviour, and the model's modules."""

    def __init__(self, setup: Setup):
        super().__init__()
        self.setup = setup
        self.unet_fn, self.text_encoder_fn, self.vae_fn = _builders(setup.model)
        self.tracker = MemoryTracker()
        self.cuda = CudaSemantics()
        self.resident: dict[str, int] = {}
        self.modules: list[torch.nn.Module] = []

    def __enter__(self):
        super().__enter__()
        self.enter_context(torch.device("meta"))
        self.enter_context(self.tracker)
        self.enter_context(self.cuda)
        return self

    def module(self, name: str, build, dtype: torch.dtype, frozen: bool = True):
        module = meta_module(build, dtype)
        if frozen:
            module.requires_grad_(False).eval()
        self.resident[name] = memtrace.storage_bytes(module_tensors(module))
        self.modules.append(module)
        return module

    def pipeline(self, prefix: str = ""):
        """Text encoder, VAE and UNet in model.dtype, frozen."""
        dtype = self.setup.frozen
        return (self.module(f"{prefix}text encoder", self.text_encoder_fn, dtype),
                self.module(f"{prefix}VAE", self.vae_fn, dtype),
                self.module(f"{prefix}base UNet", self.unet_fn, dtype))

    def latents(self, batch: int, dtype=torch.float32) -> torch.Tensor:
        size = self.setup.resolution // self.vae_scale
        return torch.randn(batch, 4, size, size, dtype=dtype)

    @property
    def vae_scale(self) -> int:
        vae = next(m for m in self.modules if hasattr(m, "decoder"))
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def embeddings(self, count: int, width: int, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(count, TEXT_LEN, width, dtype=dtype)

    def breakdown(self, section: str, grads=(), optimizer=(), buckets=()) -> Breakdown:
        clock = self.tracker.sections[section].peak_clock
        weights = [t for m in self.modules for t in module_tensors(m)]
        at = self.tracker.bytes_at
        return Breakdown(total=self.tracker.sections[section].peak, weights=at(clock, weights),
                         grads=at(clock, grads), optimizer=at(clock, optimizer), buckets=at(clock, buckets))


def latent_size(setup: Setup) -> int:
    with torch.device("meta"):
        vae = _builders(setup.model)[2]()
    return setup.resolution // 2 ** (len(vae.config.block_out_channels) - 1)


def _timesteps(batch: int) -> torch.Tensor:
    return torch.full((batch,), 500, dtype=torch.long)


class Adam:
    """Adam(W) state made up front (the steady state after the first step) and one step with torch's
    fused or foreach kernel (`torch.optim.adam.adam`, what torch.optim.AdamW runs per device and dtype)."""

    def __init__(self, params: list[torch.Tensor], decoupled_weight_decay: bool = True):
        self.params, self.decoupled = params, decoupled_weight_decay
        self.exp_avgs = [torch.zeros_like(p) for p in params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in params]
        self.steps = [torch.ones((), dtype=torch.float32) for _ in params]  # fused: one device scalar each

    def tensors(self) -> list[torch.Tensor]:
        return [*self.exp_avgs, *self.exp_avg_sqs, *self.steps]

    @torch.no_grad()
    def step(self, kernel: str) -> None:
        """kernel: "fused" (in place, no temporaries) or "foreach" (torch's default on CUDA)."""
        if kernel not in ("fused", "foreach"):
            raise ValueError(f"AdamW kernel {kernel!r} is not valid; choose fused or foreach")
        fused = kernel == "fused"
        steps = self.steps if fused else [torch.ones((), device="cpu") for _ in self.params]  # host counters
        adam(self.params, [p.grad for p in self.params], self.exp_avgs, self.exp_avg_sqs, [],
                              steps, foreach=not fused, fused=fused, decoupled_weight_decay=self.decoupled,
                              amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-5, weight_decay=0.0, eps=1e-8,
                              maximize=False)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


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
        x, t, cond, uncond = tr.latents(b), _timesteps(b), tr.embeddings(b, width), tr.embeddings(1, width)
        if "x_t chain" in parts:
            with tr.tracker.section("x_t chain"), torch.no_grad(), tr.cuda.autocast():
                eps = student(torch.cat([x, x]), _timesteps(2 * b),
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


def trace_token_attack(setup: Setup, batch: int, *, checkpointing: bool, adamw: bool) -> tuple[dict, dict]:
    """A concept-inversion (AdamW) or soft-prompt (PGD) step: gradients through the frozen UNet and text
    encoder into one token's fp32 vectors, under bf16 autocast; the base pipeline's UNet is attacked."""
    with Trace(setup) as tr:
        text_encoder, _, unet = tr.pipeline()
        if checkpointing:
            unet.enable_gradient_checkpointing(gradient_checkpointing_func=tr.cuda.checkpoint)
        width = text_encoder.config.hidden_size
        vectors = torch.zeros(1, width, requires_grad=True)
        optimizer = Adam([vectors]) if adamw else None
        gallery = tr.latents(setup.gallery_size)
        tr.tracker.reset_peak()
        with tr.tracker.section("attack step"):
            ids = torch.zeros(batch, TEXT_LEN, dtype=torch.long)
            noise = torch.randn(batch, *gallery.shape[1:])
            x_t = gallery[:batch] * 0.5 + noise * 0.5
            with tr.cuda.autocast(), _injected(text_encoder, ids == 1, vectors):
                cond = text_encoder(ids)[0]
                eps = unet(x_t.to(setup.frozen), _timesteps(batch), encoder_hidden_states=cond.to(setup.frozen)).sample
            loss = F.mse_loss(eps.float(), noise.float())
            loss.backward()
            del eps, loss, cond
            _token_update(vectors, optimizer)
        return {"attack step": tr.breakdown("attack step")}, dict(tr.resident)


def _token_update(vectors: torch.Tensor, optimizer) -> None:
    if optimizer is not None:
        optimizer.step("foreach")  # torch.optim.AdamW's default on CUDA
        optimizer.zero_grad()
        return
    with torch.no_grad():  # PGD: signed step, projection onto the L∞ ball
        vectors -= 1e-3 * vectors.grad.sign()
        vectors.copy_(vectors.clamp(-0.1, 0.1))
        vectors.grad = None


@contextlib.contextmanager
def _injected(text_encoder, mask: torch.Tensor, vectors: torch.Tensor):
    """The token's vectors in place of its embedding rows (one new (B, 77, D) tensor, as the real hook)."""
    def hook(module, inputs, output):
        return torch.where(mask[..., None], vectors[0].to(output.dtype), output)

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def trace_unlearndiffatk(setup: Setup) -> tuple[dict, dict]:
    """One UnlearnDiffAtk step: prompt_batch prompts × k relaxed one-hot slots over the vocabulary."""
    p, k = setup.uda_prompt_batch, setup.uda_prefix_tokens
    with Trace(setup) as tr:
        text_encoder, _, unet = tr.pipeline()
        table_rows = text_encoder.get_input_embeddings().weight
        vocab = table_rows.shape[0]
        weights = torch.zeros(p, k, vocab, requires_grad=True)
        optimizer = Adam([weights], decoupled_weight_decay=False)
        gallery = tr.latents(32)
        tr.tracker.reset_peak()
        with tr.tracker.section("attack step"):
            table = table_rows.detach()[torch.arange(vocab)].float()  # (V, D)
            ids = torch.zeros(p, TEXT_LEN, dtype=torch.long)
            noise = torch.randn(p, *gallery.shape[1:])
            x_t = gallery[:p] * 0.5 + noise * 0.5
            with tr.cuda.autocast():
                prefix = weights @ table  # (P, k, D)
                with soft_prefix(text_encoder, prefix):
                    cond = text_encoder(ids)[0]
                eps = unet(x_t.to(setup.frozen), _timesteps(p), encoder_hidden_states=cond.to(setup.frozen)).sample
            loss = F.mse_loss(eps.float(), noise.float())
            optimizer.zero_grad()
            loss.backward()
            del eps, loss, cond, prefix
            optimizer.step("foreach")
            with torch.no_grad():
                weights.copy_(project_to_simplex(weights))
            del table
        return {"attack step": tr.breakdown("attack step")}, dict(tr.resident)


def trace_ring_a_bell(setup: Setup, encode_batch: int = 256) -> tuple[dict, dict]:
    """One Ring-A-Bell generation: the population's hard prompts through the base text encoder, no grad."""
    with Trace(setup) as tr:
        text_encoder, _, _ = tr.pipeline()
        width = text_encoder.config.hidden_size
        count = setup.rab_population * setup.rab_prompt_batch
        tr.tracker.reset_peak()
        with tr.tracker.section("fitness"), torch.no_grad():
            goals = torch.randn(setup.rab_prompt_batch, TEXT_LEN, width)
            ids = torch.zeros(count, TEXT_LEN, dtype=torch.long)
            states = torch.cat([text_encoder(ids[i:i + encode_batch])[0].float()
                                for i in range(0, count, encode_batch)])
            states = states.view(setup.rab_prompt_batch, setup.rab_population, TEXT_LEN, width)
            distance = (states - goals[:, None]).pow(2).mean(dim=(2, 3))
            del states, distance
        return {"fitness": tr.breakdown("fitness")}, dict(tr.resident)


def trace_generation(setup: Setup) -> tuple[dict, dict]:
    """Evaluation generation: CFG UNet steps on 2×batch latents, then the VAE decode of batch images."""
    n = setup.generation_batch
    with Trace(setup) as tr:
        text_encoder, vae, unet = tr.pipeline()
        tr.tracker.reset_peak()
        with torch.no_grad():
            with tr.tracker.section("text encoder"):
                cond = text_encoder(torch.zeros(2 * n, TEXT_LEN, dtype=torch.long))[0]
            with tr.tracker.section("UNet step (CFG)"):
                latents = tr.latents(n, setup.frozen)
                eps = unet(torch.cat([latents, latents]), _timesteps(2 * n), encoder_hidden_states=cond).sample
                eps_uncond, eps_cond = eps.chunk(2)
                latents = latents - 0.1 * (eps_uncond + 7.5 * (eps_cond - eps_uncond))
                del eps, eps_uncond, eps_cond
            with tr.tracker.section("VAE decode"):
                image = vae.decode(latents / vae.config.scaling_factor).sample
                image = (image / 2 + 0.5).clamp(0, 1)
                del image
        return {k: tr.breakdown(k) for k in tr.tracker.sections}, dict(tr.resident)


# ----------------------------------------------------------------------------------------------
# The phases
# ----------------------------------------------------------------------------------------------
def _erasure_phase(name: str, traced, optimizer: str, bar: float | None) -> Phase:
    sections, resident, _ = traced
    other = OPT_SECTIONS["foreach" if optimizer == "fused" else "fused"]
    return Phase(name, sections, dict(resident), bar).renamed(name, bar, drop=(other,))


def estimate(setup: Setup, log=print) -> list[Phase]:
    """Every phase of the issue's list, after the fixes and (where something changed) before them."""
    began = time.perf_counter()
    tick = lambda what: log(f"  traced {what} ({time.perf_counter() - began:.1f} s)")  # noqa: E731
    esd = trace_erasure(setup, conditions=2)
    tick("ESD step")
    ddp_view, ddp_copy = (_ddp_step(setup, esd, mode) for mode in ("view", "copy"))
    tick("DDP steps")
    negatives = setup.concept_prompts + setup.rounds * setup.concept_prompts
    reo_teacher = trace_erasure(setup, conditions=1 + setup.anchors_per_step + negatives, parts=("teacher",))
    reo = ({**esd[0], "teacher": reo_teacher[0]["teacher"]}, esd[1], esd[2])
    tick("REO teacher")
    ste_attack = trace_token_attack(setup, setup.inversion_batch, checkpointing=setup.gradient_checkpointing,
                                    adamw=True)
    tick("STE attack")
    unet_bf16 = esd[1]["base UNet"]
    adamw_state = esd[0][OPT_SECTIONS["fused"]].optimizer
    gallery = round_up(setup.gallery_size * 4 * latent_size(setup) ** 2 * 4)  # fp32 latents

    phases = [_erasure_phase("ESD-u, 1 GPU", esd, "fused", BARS_GIB["esd"]),
              _erasure_phase("ESD-u, 1 GPU — before: foreach AdamW", esd, "foreach", None),
              _erasure_phase("ESD-u, 4-process DDP, per GPU (bucket view, fused)", ddp_view, "fused", BARS_GIB["ddp"]),
              _erasure_phase("ESD-u, DDP — bucket view, foreach AdamW", ddp_view, "foreach", None),
              _erasure_phase("ESD-u, DDP — buckets as copies, fused AdamW", ddp_copy, "fused", None),
              _erasure_phase("ESD-u, DDP — before: buckets as copies, foreach AdamW", ddp_copy, "foreach", None)]
    for k in range(setup.rounds):
        phases += _ste_round(setup, k, esd, ste_attack, unet_bf16, adamw_state, gallery)
    reo_name = f"REO after {setup.rounds} rounds (teacher batch {1 + setup.anchors_per_step + negatives}×{setup.batch})"
    phases.append(_erasure_phase(reo_name, reo, "fused", BARS_GIB["reo"]))
    phases.append(_erasure_phase(reo_name + " — before: every round's UNet + AdamW kept, foreach", reo, "foreach",
                                 None).with_resident("kept STE UNets + AdamW states", setup.rounds * unet_bf16,
                                                     setup.rounds * adamw_state))
    phases += _evaluation(setup, tick)
    return phases


def _ddp_step(setup: Setup, esd, mode: str):
    """DDP: only the student's forward/backward and the optimiser step change; before them the grads
    are None and the buckets, allocated once, are simply there (a constant offset)."""
    traced, resident, trainable = trace_erasure(setup, 2, ddp=mode, parts=("student forward+backward", "optimizer"))
    buckets = traced[OPT_SECTIONS["fused"]].buckets
    early = {k: b.plus(buckets=buckets) for k, b in esd[0].items() if k in ("x_t chain", "teacher")}
    return {**early, **traced}, resident, trainable


def _ste_round(setup, k, esd, attack, unet_bf16, adamw_state, gallery) -> list[Phase]:
    unet_fp32 = 2 * unet_bf16  # STE's erased UNets keep the student's fp32 weights (stereo/ste.py `_erase`)
    erase = _erasure_phase(f"STE round {k} erase", esd, "fused", BARS_GIB["ste"])
    erase = erase.with_resident("gallery latents", gallery).with_resident(
        "teacher (round k-1's erased UNet, fp32)", unet_fp32 if k else 0)
    before = _erasure_phase(f"STE round {k} erase — before: earlier rounds kept, foreach", esd, "foreach", None)
    before = before.with_resident("gallery latents", gallery).with_resident(
        "kept earlier rounds' UNets (one is the teacher) + AdamW", k * unet_bf16, k * adamw_state)
    sections, resident = attack
    hit = Phase(f"STE round {k} attack (concept inversion)", sections, dict(resident), BARS_GIB["ste"])
    hit = hit.with_resident("gallery latents", gallery).with_resident(
        "erased UNets of rounds k-1 and k (fp32)", (2 if k else 1) * unet_fp32).with_resident(
        "fp32 attack activations (traced in bf16, counted twice)", sections["attack step"].activations)
    hit_before = Phase(f"STE round {k} attack — before", sections, dict(resident)).with_resident(
        "gallery latents", gallery).with_resident("kept UNets + AdamW of rounds 0..k", (k + 1) * unet_bf16,
                                                  (k + 1) * adamw_state)
    return [erase, before, hit, hit_before]


def _evaluation(setup: Setup, tick) -> list[Phase]:
    """Evaluating an erased model: its pipeline with the base pipeline beside it (galleries, Ring-A-Bell)."""
    phases = []
    runs = [("concept inversion", lambda: trace_token_attack(setup, setup.eval_inversion_batch, checkpointing=False,
                                                              adamw=True)),
            ("soft prompt", lambda: trace_token_attack(setup, setup.eval_soft_prompt_batch, checkpointing=False,
                                                        adamw=False)),
            ("UnlearnDiffAtk", lambda: trace_unlearndiffatk(setup)),
            ("Ring-A-Bell", lambda: trace_ring_a_bell(setup)),
            ("generation", lambda: trace_generation(setup))]
    for name, run in runs:
        sections, resident = run()
        tick(name)
        pipe = sum(resident[k] for k in ("text encoder", "VAE", "base UNet"))
        label = f"evaluation: {name}" if name == "generation" else f"evaluation attack: {name}"
        phases.append(Phase(label, sections, resident).with_resident("the other pipeline (base / evaluated)", pipe))
    return phases


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def table(phases: list[Phase]) -> str:
    rows = ["| phase | weights | grads | optimiser | DDP buckets | activations & temporaries | total peak | "
            "peak in | bar | met |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in phases:
        b = p.peak
        bar = f"≤ {p.bar_gib:g}" if p.bar_gib else ""
        met = "" if p.met is None else ("**met**" if p.met else "**NOT met**")
        rows.append(f"| {p.name} | {gib(b.weights)} | {gib(b.grads)} | {gib(b.optimizer)} | {gib(b.buckets)} | "
                    f"{gib(b.activations)} | **{gib(b.total)}** | {p.peak_section} | {bar} | {met} |")
    return "\n".join(rows)


ISSUE_ESTIMATES = [  # issue 11's figures for the code it describes, and the rows that reproduce them
    ("STE round 1 ≈ 25 GiB", "STE round 1 erase — before", "STE round 1 erase"),
    ("REO after 4 rounds ≈ 48 GiB", "REO after 4 rounds", "REO after 4 rounds"),
    ("multi-GPU ESD-u per GPU ≈ 20 GiB", "ESD-u, DDP — before", "ESD-u, 4-process DDP"),
]


def findings(phases: list[Phase]) -> str:
    def find(prefix: str, before: bool) -> Phase | None:
        return next((p for p in phases if p.name.startswith(prefix) and ("before" in p.name) == before), None)

    lines = []
    for claim, before_row, after_row in ISSUE_ESTIMATES:
        before, after = find(before_row, True), find(after_row, False)
        if before and after:
            lines.append(f"- {claim} (issue): before {gib(before.peak.total)} GiB ({before.name}); "
                         f"after {gib(after.peak.total)} GiB ({after.name})")
    return "\n".join(lines)


def sections_table(phases: list[Phase]) -> str:
    names = list(dict.fromkeys(k for p in phases for k in p.sections))
    rows = ["| phase | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for p in phases:
        cells = [gib(p.sections[k].total) if k in p.sections else "" for k in names]
        rows.append(f"| {p.name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def estimates_json(phases: list[Phase], setup: Setup) -> dict:
    """The machine-readable estimate (for scripts/gpu_check.sh): peak bytes per phase and their parts."""
    return {"setup": asdict(setup), "unit": "bytes (torch.cuda.max_memory_allocated semantics)",
            "phases": {p.name: p.as_dict() for p in phases}}


def write_results(phases: list[Phase], setup: Setup, out: Path, seconds: float) -> Path:
    import harness

    from stereo.manifest import write_json_atomic, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"memory_{'sd14' if setup.model == 'sd14-random' else setup.model}"
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/memory.py", *sys.argv[1:]])
    info = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(seconds, 1), "machine": harness.machine(), **estimates_json(phases, setup)}
    write_json_atomic(stem.with_suffix(".json"), info)
    write_text_atomic(stem.with_suffix(".md"), markdown(phases, setup, info))
    return stem


def markdown(phases: list[Phase], setup: Setup, info: dict) -> str:
    m = info["machine"]
    bars = [p for p in phases if p.bar_gib]
    verdict = "\n".join(f"- {p.name}: {gib(p.peak.total)} GiB ≤ {p.bar_gib:g} GiB: "
                        f"{'met' if p.met else 'NOT met'}" for p in bars)
    title = f"Peak GPU memory per phase ({setup.model}, {setup.resolution} px, trainer=gpu), estimated on meta tensors"
    return f"""# {title}

`{info['command']}`

{info['date']}, {info['seconds']} s on {m['cpu']}; torch {m['torch']}, diffusers {m['diffusers']}, \
transformers {m['transformers']}, commit {m['git_commit']}

GiB = 2^30 bytes. "Peak" is what torch.cuda.max_memory_allocated reports (tensor storages in 512-byte
blocks); a real card also needs the CUDA context (~0.5 GiB) and the caching allocator's reserve.

## Bars (issue 11)

{verdict}

## The issue's estimates, before and after the fixes

{findings(phases)}

## Per phase

{table(phases)}

Columns are the parts at the phase's peak: weights (every resident module), grads and AdamW state
alive at that instant, DDP buckets, and the rest (activations saved for backward, temporaries,
autocast's bf16 copies of trainable weights). "peak in" names the part of the step where it occurs.

## Peak of each part of the step (GiB, everything resident included)

{sections_table([p for p in phases if p.bar_gib or "before" in p.name])}

## Settings (from the configs: model={setup.model} trainer=gpu method=stereo concept=nudity)

{_settings(setup)}

## How it is estimated

- The real modules (diffusers UNet2DConditionModel / AutoencoderKL, transformers CLIPTextModel from
  the model's configs) run forward and backward on meta tensors (shapes, no data); a TorchDispatchMode counts storage
  bytes as ops create them and as Python frees them. AdamW (fused and foreach kernels), gradient
  checkpointing (torch.utils.checkpoint, non-reentrant) and `noxattn`/`xattn` subsets are the real ones.
- CUDA behaviour is emulated: bf16 autocast with CUDA's op lists (group/layer norm, upsampling and
  losses in fp32; autocast's cache of bf16 casts of fp32 trainable weights, alive until the autocast
  region ends), and scaled-dot-product attention as a fused kernel (flash / memory-efficient: no
  L×L matrix; saves out + fp32 log-sum-exp). If a kernel falls back to the math path (e.g. the VAE's
  512-wide single-head attention), that phase needs more.
- One step of each loop is traced: the x_t chain keeps no state between DDIM steps, so one step's
  peak is the chain's. AdamW state is created before the traced step (steady state).
- Phases that differ only by tensors resident for the whole phase (an extra UNet, kept AdamW state,
  the gallery) add those bytes to the traced step: exact, since they are there at every instant.
- Not counted: the CUDA context, cuDNN/cuBLAS workspaces, the allocator's fragmentation (compare
  with torch.cuda.max_memory_reserved on a card), sample grids during training (`sample_every`),
  detectors / CLIP / Inception during evaluation, LoRA runs.
"""


def _settings(setup: Setup) -> str:
    s = setup
    return "\n".join([
        f"- frozen parts (text encoder, VAE, base UNet, teachers, erased UNets): {s.frozen_dtype}; "
        f"student UNet fp32 with `{s.subset}` trainable; bf16 autocast; gradient checkpointing "
        f"{s.gradient_checkpointing}; batch {s.batch} latents per process",
        f"- teacher forward {'inside' if s.teacher_autocast else 'outside'} autocast (frozen in {s.frozen_dtype})",
        f"- STEREO: {s.rounds} rounds, {s.concept_prompts} concept prompt(s), each round erases all found so far; "
        f"STE gallery {s.gallery_size} latents on the GPU; inversion batch {s.inversion_batch}; "
        f"REO {s.anchors_per_step} anchor(s) per step",
        f"- evaluation: concept inversion batch {s.eval_inversion_batch}, soft prompt batch "
        f"{s.eval_soft_prompt_batch}, UnlearnDiffAtk {s.uda_prompt_batch} prompts × {s.uda_prefix_tokens} "
        f"slots over the vocabulary, Ring-A-Bell population {s.rab_population} × {s.rab_prompt_batch} prompts, "
        f"generation batch {s.generation_batch} (CFG: {2 * s.generation_batch} latents)",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd14-random", choices=["sd14-random", "tiny"])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for memory_<model>.{md,json}")
    parser.add_argument("--json", metavar="PATH", help="also write the per-phase estimate as JSON ('-': stdout)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    setup = read_setup(args.model)
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
        print(f"wrote {write_results(phases, setup, args.out, seconds)}.{{md,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
