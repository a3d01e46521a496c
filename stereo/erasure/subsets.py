"""Which UNet parameters erasure trains: ESD's named subsets, or a LoRA adapter on one of them.

- `xattn`    cross-attention (`attn2`) Linear layers only ("ESD-x", for styles);
- `noxattn`  every Linear/Conv2d except cross-attention ("ESD-u", for nudity and objects);
- `selfattn` self-attention (`attn1`) Linear layers only;
- `full`     every parameter of the UNet.
"""

from __future__ import annotations

import copy

from diffusers import UNet2DConditionModel
from torch import nn

SUBSETS = ("xattn", "noxattn", "selfattn", "full")


def _in_subset(name: str, module: nn.Module, subset: str) -> bool:
    is_layer = isinstance(module, (nn.Linear, nn.Conv2d))
    parts = name.split(".")
    if subset == "xattn":
        return is_layer and "attn2" in parts
    if subset == "selfattn":
        return is_layer and "attn1" in parts
    if subset == "noxattn":
        return is_layer and "attn2" not in parts
    return is_layer  # full: every layer (LoRA targets); plain full fine-tuning takes all parameters


def subset_module_names(unet: UNet2DConditionModel, subset: str) -> list[str]:
    """Names of the Linear/Conv2d modules a subset covers (LoRA target modules)."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown parameter subset {subset!r}; choose one of {', '.join(SUBSETS)}")
    names = [name for name, module in unet.named_modules() if _in_subset(name, module, subset)]
    if not names:
        raise ValueError(f"parameter subset {subset!r} selects no layer of this UNet")
    return names


def subset_parameter_names(unet: UNet2DConditionModel, subset: str) -> list[str]:
    """Names of the parameters a subset covers (for `full`: all of them)."""
    modules = set(subset_module_names(unet, subset))
    return [name for name, _ in unet.named_parameters() if subset == "full" or name.rsplit(".", 1)[0] in modules]


def select_trainable(unet: UNet2DConditionModel, subset: str) -> list[str]:
    """Freeze the UNet except `subset`; returns the trainable parameter names."""
    names = subset_parameter_names(unet, subset)
    unet.requires_grad_(False)
    for name in names:
        unet.get_parameter(name).requires_grad_(True)
    return names


def add_lora(unet: UNet2DConditionModel, subset: str, rank: int, alpha: float, dropout: float) -> list[str]:
    """Freeze the UNet and attach a peft LoRA adapter on the subset's layers; returns its parameter names."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
        target_modules=subset_module_names(unet, subset),
    )
    unet.add_adapter(config)
    return [name for name, param in unet.named_parameters() if param.requires_grad]


def make_student(init: UNet2DConditionModel, subset: str, lora) -> tuple[UNet2DConditionModel, object, list[str]]:
    """A trainable fp32 copy of `init` with `subset` (or a LoRA adapter on it, `lora.enabled`) unfrozen.

    Returns (student, teacher, trainable names). The teacher is `init` itself, or None with LoRA: the
    student with its adapter disabled is the base model, no second copy of the weights needed.
    """
    student = copy.deepcopy(init).float()
    if lora.enabled:
        return student, None, add_lora(student, subset, lora.rank, lora.alpha, lora.dropout)
    return student, init, select_trainable(student, subset)
