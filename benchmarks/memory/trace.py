"""Tracing one step on meta tensors: the trace context (tracker, CUDA semantics, the modules built),
the breakdown of a peak into its parts, and AdamW with torch's own fused / foreach kernels."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from torch.optim.adam import adam

from benchmarks.memory import memtrace
from benchmarks.memory.configs import Setup, builders
from benchmarks.memory.memtrace import CudaSemantics, MemoryTracker, meta_module, module_tensors

TEXT_LEN = 77


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


class Trace(contextlib.ExitStack):
    """Meta tensors by default + the byte tracker + CUDA allocation behaviour, and the model's modules."""

    def __init__(self, setup: Setup):
        super().__init__()
        self.setup = setup
        self.unet_fn, self.text_encoder_fn, self.vae_fn = builders(setup.model)
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


def timesteps(batch: int) -> torch.Tensor:
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
             amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-5, weight_decay=0.0, eps=1e-8, maximize=False)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
