"""Third-party erased components put on a base pipeline: an erased text encoder (AdvUnlearn), UNet, LoRA or
textual-inversion file, each checked against the pipeline's own architecture before it replaces anything.

`load_text_encoder_weights` reads a CLIPTextModel folder (`config.json` + `model.safetensors` or
`pytorch_model.bin`, as `save_pretrained` writes it and AdvUnlearn ships it), a `.safetensors` file or a
`.pt/.pth/.bin` state dict (read with `weights_only=True`). Like `load_unet_weights`, unknown names, missing
names (for a complete checkpoint) and shape mismatches raise, so a checkpoint of another tower cannot load
silently. `apply_component` dispatches on the registry's component names (stereo.models.released.COMPONENTS).
"""

from __future__ import annotations

from pathlib import Path

import torch

from stereo.models.loading import load_matching, load_unet_weights, read_state_dict
from stereo.models.released import COMPONENTS

TEXT_ENCODER_PREFIXES = ("module.", "text_encoder.", "cond_stage_model.transformer.")
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def read_text_encoder_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Tensors of an erased text encoder and whether they claim to be complete (a folder or a torch state
    dict: yes; a .safetensors file: it may be a trained subset). A pipeline folder's `text_encoder/` works too."""
    folder_files = (*FOLDER_WEIGHTS, *(f"text_encoder/{name}" for name in FOLDER_WEIGHTS))
    return read_state_dict(path, "erased text-encoder", folder_files, TEXT_ENCODER_PREFIXES)


def load_text_encoder_weights(text_encoder: torch.nn.Module, path: str | Path) -> list[str]:
    """Overwrite `text_encoder`'s tensors with an erased text encoder's; returns the names loaded."""
    state, complete = read_text_encoder_state_dict(path)
    own = text_encoder.state_dict()
    state = _match_text_model_prefix(state, own)
    # position_ids is a buffer older transformers saved and newer ones rebuild: never a weight
    state = {k: v for k, v in state.items() if k in own or not k.endswith("position_ids")}
    return load_matching(text_encoder, state, complete, path, "text encoder",
                         "Is it a CLIPTextModel of the base model's text tower?", require_tensors=True)


def _match_text_model_prefix(state: dict, own: dict) -> dict:
    """transformers < 5 names a CLIPTextModel's tensors `text_model.<name>` (so do released checkpoints);
    transformers 5 drops the prefix. Name the checkpoint's tensors as `own` does."""
    prefix = "text_model."
    own_prefixed = any(k.startswith(prefix) for k in own)
    if own_prefixed and not any(k.startswith(prefix) for k in state):
        return {prefix + k: v for k, v in state.items()}
    if not own_prefixed:
        return {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def apply_component(pipe, component: str, path: str | Path) -> None:
    """Put a third-party checkpoint on `pipe` in place of its `component` (one of COMPONENTS)."""
    path = Path(path)
    if component == "unet":
        load_unet_weights(pipe.unet, path)
    elif component == "text_encoder":
        load_text_encoder_weights(pipe.text_encoder, path)
    elif component == "lora":
        folder, weight_name = (path, None) if path.is_dir() else (path.parent, path.name)
        pipe.load_lora_weights(str(folder), weight_name=weight_name)
    elif component == "textual_inversion":
        pipe.load_textual_inversion(str(path))
    else:
        raise ValueError(f"component={component!r} is not valid; choose one of {', '.join(COMPONENTS)}")
