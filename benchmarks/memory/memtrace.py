"""Peak accelerator memory of a PyTorch program, traced on meta tensors: no GPU, no weights.

Three pieces, used together by the memory estimate (`benchmarks.memory`):

- `MemoryTracker`, a TorchDispatchMode that counts the bytes of live tensor storages the way
  torch.cuda.memory_allocated does: + when an op returns a tensor with a storage not seen yet
  (rounded up to the CUDA caching allocator's 512-byte blocks), - when Python frees that storage
  (a weakref finalizer). It keeps the peak, the peak of each named section, and when each
  storage was made, so the bytes of chosen tensors (gradients, optimiser states) alive at a
  peak can be read off afterwards.
- `CudaSemantics`, a TorchFunctionMode that makes a CPU trace allocate what the CUDA path
  allocates: bf16 autocast with CUDA's op lists (matmuls/convolutions in bf16; norms, upsampling,
  losses, pow/exp in fp32; casts of fp32 leaf parameters that require grad cached until the
  autocast region ends, as torch.autocast does), and scaled-dot-product attention as a fused
  flash/memory-efficient kernel (saves q, k, v, out and a (B, H, L) fp32 log-sum-exp; never an
  L x L matrix). CPU autocast has other op lists and CPU attention may materialise the L x L
  matrix, so neither can be used as they are (and there is no autocast for the meta device).
- `meta_module`: a module built on the meta device (shapes and dtypes, no data), counted by the
  tracker. Every traced program runs on meta tensors: their kernels compute only shapes, so a
  step of SD 1.4 takes seconds.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

GIB = 2**30
CUDA_BLOCK = 512  # the caching allocator rounds every allocation up to a multiple of this

# torch.autocast's CUDA op lists (aten/src/ATen/autocast_mode.h), by the name of the Python-level function
LOWER_PRECISION = frozenset({
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose2d", "matmul", "__matmul__", "__rmatmul__", "mm",
    "bmm", "baddbmm", "addmm", "addbmm", "einsum", "prelu", "scaled_dot_product_attention",
})
FP32 = frozenset({
    "group_norm", "layer_norm", "exp", "expm1", "log", "log1p", "pow", "__pow__", "rsqrt", "reciprocal",
    "softplus", "mse_loss", "l1_loss", "smooth_l1_loss", "cosine_similarity", "logsumexp", "interpolate",
    "cdist", "softmax", "log_softmax", "cumsum", "cumprod", "prod", "sum", "norm",
})


def round_up(nbytes: int, block: int = CUDA_BLOCK) -> int:
    return -(-nbytes // block) * block if block > 1 else nbytes


@dataclass
class Section:
    """Live bytes when a named part of the program began and at its highest point."""

    start: int
    peak: int
    peak_clock: int


class MemoryTracker(TorchDispatchMode):
    """Live and peak bytes of tensor storages made by ops run while the mode is active."""

    def __init__(self, block: int = CUDA_BLOCK, devices: tuple[str, ...] = ("meta", "cuda")):
        super().__init__()
        self.block, self.devices = block, devices  # host tensors (e.g. AdamW's step counters) are not counted
        self.live = self.peak = self.clock = self.peak_clock = 0
        self.sections: dict[str, Section] = {}
        self._section: Section | None = None
        self._storages = WeakIdKeyDictionary()  # storage -> (bytes, clock when first seen)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.clock += 1
        self.track(*(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)))
        return out

    def track(self, *tensors: torch.Tensor) -> None:
        """Count tensors' storages (also ones made before the mode started, e.g. module weights)."""
        for tensor in tensors:
            if tensor.device.type not in self.devices:
                continue
            storage = tensor.untyped_storage()
            if storage in self._storages:
                continue
            nbytes = round_up(storage.nbytes(), self.block)
            self._storages[storage] = (nbytes, self.clock)
            weakref.finalize(storage, self._free, nbytes)
            self.live += nbytes
            if self.live > self.peak:
                self.peak, self.peak_clock = self.live, self.clock
            if self._section is not None and self.live > self._section.peak:
                self._section.peak, self._section.peak_clock = self.live, self.clock

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def reset_peak(self) -> None:
        self.peak, self.peak_clock = self.live, self.clock

    @contextlib.contextmanager
    def section(self, name: str):
        """Record the peak of the enclosed code under `name` (sections do not nest)."""
        self._section = self.sections[name] = Section(self.live, self.live, self.clock)
        try:
            yield self._section
        finally:
            self._section = None

    def bytes_at(self, clock: int, tensors: Iterable[torch.Tensor]) -> int:
        """Bytes of these (still alive) tensors' distinct storages that already existed at `clock`."""
        seen, total = set(), 0
        for tensor in tensors:
            storage = tensor.untyped_storage()
            nbytes, made = self._storages.get(storage, (0, clock + 1))
            if made <= clock and id(storage) not in seen:
                seen.add(id(storage))
                total += nbytes
        return total


def storage_bytes(tensors: Iterable[torch.Tensor], block: int = CUDA_BLOCK) -> int:
    """Bytes of the distinct storages of `tensors`, as the allocator would hand them out."""
    storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}
    return sum(round_up(n, block) for n in storages.values())


# ----------------------------------------------------------------------------------------------
# CUDA's allocation behaviour on a CPU trace: autocast op lists and fused attention
# ----------------------------------------------------------------------------------------------
class FusedAttention(torch.autograd.Function):
    """What flash / memory-efficient SDPA allocates: the output and a fp32 log-sum-exp, saved with
    q, k, v for backward; backward makes dq, dk, dv and a fp32 dq accumulator (flash-attention 2)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        accumulator = q.new_empty(q.shape, dtype=torch.float32)
        grads = tuple(torch.empty_like(x) if need else None for x, need in zip((q, k, v), ctx.needs_input_grad))
        del accumulator
        return grads


class CudaSemantics(TorchFunctionMode):
    """Allocate as CUDA would: fused attention always, bf16 autocast (CUDA's lists) inside `autocast()`."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        self.enabled = False
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    @contextlib.contextmanager
    def autocast(self, enabled: bool = True, cache: bool = True):
        """Like `torch.autocast("cuda", bf16)`; the cast cache (fp32 leaves that require grad) lives until exit.

        Backward's recomputation of checkpointed blocks runs with `cache=False`: each recomputed
        block re-enters autocast on its own, so a weight's cast lives only as long as that block.
        """
        saved = self.enabled, self._cache
        self.enabled, self._cache = enabled, ({} if enabled and cache else None)
        try:
            yield
        finally:
            self.enabled, self._cache = saved

    def checkpoint(self, function, *args, **kwargs):
        """torch.utils.checkpoint (non-reentrant) whose recomputation runs in this mode, with the autocast
        state of the forward. The autograd engine runs backward without Python function modes, so
        without this the recomputed blocks would differ from the forward's (and checkpoint refuses)."""
        enabled = self.enabled

        def run(*a, **k):
            if self in _get_current_function_mode_stack():
                return function(*a, **k)
            with self, self.autocast(enabled, cache=False):
                return function(*a, **k)

        kwargs = {**kwargs, "preserve_rng_state": False}  # RNG state lives on the host: no device bytes
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

    def _cast(self, dtype: torch.dtype) -> Callable:
        def cast(x):
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype in (dtype, torch.float64):
                return x
            cacheable = self._cache is not None and x.is_leaf and x.requires_grad and x.dtype == torch.float32
            if cacheable and id(x) in self._cache:
                return self._cache[id(x)][1]
            y = x.to(dtype)
            if cacheable:
                self._cache[id(x)] = (x, y)
            return y
        return cast

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "scaled_dot_product_attention":
            q, k, v = _qkv(args, kwargs)
            if self.enabled:
                q, k, v = map(self._cast(self.dtype), (q, k, v))
            return FusedAttention.apply(q, k, v)
        if self.enabled and name in LOWER_PRECISION:
            args, kwargs = tree_map(self._cast(self.dtype), (args, kwargs))
        elif self.enabled and name in FP32 and kwargs.get("dtype") is None:
            args, kwargs = tree_map(self._cast(torch.float32), (args, kwargs))
        return func(*args, **kwargs)


def _qkv(args, kwargs):
    names = ("query", "key", "value")
    values = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]):]]
    return values


# ----------------------------------------------------------------------------------------------
# Modules on the meta device
# ----------------------------------------------------------------------------------------------
def meta_module(build: Callable[[], nn.Module], dtype: torch.dtype) -> nn.Module:
    """`build()` on the meta device (shapes only: no init kernels, no memory) with floating tensors in `dtype`.

    Built while a MemoryTracker is active, its parameters and buffers are counted.
    """
    with torch.device("meta"):
        return nn.Module.to(build(), dtype)  # nn.Module's own: diffusers' `to` warns about casts here


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]
