"""The numeric precision of attack optimisation against frozen models (fp32, fp16 or bf16 weights).

An attack trains a few variables (token vectors, soft prompts, relaxed one-hot weights) through
a frozen text encoder and UNet. Backpropagating through pure fp16 without loss scaling underflows
the small gradients (fp16's smallest normal is 6e-5), which weakens the attack and understates ASR;
pure fp32 on a GPU is 2-3x slower (STE attacks its fp32 erased UNet with a 3000-step inversion). The
rule is token/prompt optimisation with fp32 parameters under bf16 autocast. So, as STE's inversion does:
- the trainable variables are fp32 and the loss is computed in fp32 (`denoising_loss`);
- the frozen weights stay in their dtype;
- on CUDA, whatever the weights' dtype (fp32 included), the forward runs under bf16 autocast
  (fp32's exponent range, no loss scaling needed), its inputs left in fp32 for autocast to cast;
- elsewhere (CPU) inputs are cast to the module's dtype explicitly: CPU autocast does not cast
  every op's inputs (ENVIRONMENT.md), so relying on it fails there.
Erasure has its own rule (`stereo/erasure/trainer.py`, "Precision"): there the UNet itself trains, under
the accelerator's `trainer.mixed_precision`, and only its frozen teacher runs in half precision as it is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

AUTOCAST_DEVICES = ("cuda",)  # devices whose autocast casts every op of a diffusion model's forward


@dataclass(frozen=True)
class Precision:
    """How to run one frozen module in an attack: `autocast` (bf16, on CUDA) or explicit casts (elsewhere)."""

    device_type: str
    dtype: torch.dtype  # the module's weights
    autocast: bool

    @classmethod
    def of(cls, module) -> Precision:
        weight = next(module.parameters())
        autocast = weight.device.type in AUTOCAST_DEVICES  # fp32 weights too: bf16 forward, fp32 variables
        return cls(weight.device.type, weight.dtype, autocast)

    def context(self):
        """bf16 autocast on CUDA (any weight dtype); otherwise nothing."""
        if self.autocast:
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def input(self, tensor: torch.Tensor) -> torch.Tensor:
        """A floating input of the module: fp32 under autocast (it casts), else the module's dtype."""
        return tensor.float() if self.autocast else tensor.to(self.dtype)
