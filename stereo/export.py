"""Exporting an erased UNet in the formats people load, atomically, with a manifest.

Layout of an export folder:
  unet/                    diffusers UNet: UNet2DConditionModel.from_pretrained(dir / "unet")
  pipeline/                full StableDiffusionPipeline.from_pretrained(dir / "pipeline"), saved in fp32
  delta.safetensors        only the trained tensors (apply with stereo.models.load_unet_weights)
  lora/                    adapter for pipe.load_lora_weights(dir / "lora")
  manifest.json            resolved config, seed, base model, subset, versions, commit, sha256 per file
  README.md                the model card (stereo.modelcard), built from manifest.json; not hashed in it:
                           `stereo.publish` writes it again with the Hub repo id and the evaluation table
Everything is written into a hidden sibling folder that is renamed into place at the end, so
a killed export never leaves a folder that looks complete. `apply_export` reads one back (evaluation).
"""

from __future__ import annotations

import copy
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from omegaconf import OmegaConf
from safetensors.torch import save_file

from stereo.config import ModelConfig
from stereo.manifest import sha256_file, write_json_atomic, write_text_atomic
from stereo.modelcard import CARD_NAME, build_card
from stereo.models.loading import ModelLoadError, load_pipeline, load_unet_weights


def trainable_state_dict(unet: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The named parameters as contiguous CPU tensors (what `delta.safetensors` holds)."""
    params = dict(unet.named_parameters())
    return {name: params[name].detach().cpu().contiguous() for name in names}


def has_lora(unet) -> bool:
    return bool(getattr(unet, "peft_config", None))


def merged_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A plain UNet equal to `unet` with its LoRA adapter folded into the base weights (W + s·BA)."""
    if not has_lora(unet):
        return unet
    from peft.tuners.tuners_utils import BaseTunerLayer

    deltas = {}
    for name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer):
            deltas[f"{name}.weight"] = sum(module.get_delta_weight(a) for a in module.active_adapters)
    state = {}
    for key, value in unet.state_dict().items():
        if "lora_" in key:
            continue
        key = key.replace(".base_layer", "")
        state[key] = (value + deltas[key].to(value.dtype)) if key in deltas else value
    plain = UNet2DConditionModel.from_config(unet.config)
    plain.load_state_dict(state, strict=True)
    reference = next(unet.parameters())
    return plain.to(reference.device, reference.dtype)


def export_erased(
    out_dir: str | Path,
    unet: UNet2DConditionModel,
    trainable_names: list[str],
    formats: list[str],
    manifest: dict[str, Any],
    pipe: StableDiffusionPipeline | None = None,
) -> Path:
    """Write the requested formats of the erased `unet` to `out_dir` (replacing an older export)."""
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        plain = merged_unet(unet) if ("unet" in formats or "pipeline" in formats) else None
        if "unet" in formats:
            plain.save_pretrained(tmp / "unet", safe_serialization=True)
        if "pipeline" in formats:
            if pipe is None:
                raise ValueError("export format 'pipeline' needs the base pipeline")
            _save_pipeline(pipe, plain, tmp / "pipeline")
        if "delta" in formats:
            save_file(trainable_state_dict(unet, trainable_names), str(tmp / "delta.safetensors"),
                      metadata={"format": "stereo-delta", "tensors": str(len(trainable_names))})
        if "lora" in formats:
            _save_lora(unet, tmp / "lora")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {**manifest, "formats": list(formats),
                    "files": {str(p.relative_to(tmp)): sha256_file(p) for p in files}}
        write_json_atomic(tmp / "manifest.json", manifest)
        write_text_atomic(tmp / CARD_NAME, str(build_card(tmp, manifest)))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _save_pipeline(pipe: StableDiffusionPipeline, unet: UNet2DConditionModel, path: Path) -> None:
    """The base pipeline with the erased UNet, every component saved in fp32 (copies; `pipe` is untouched).

    One dtype on disk is what makes `StableDiffusionPipeline.from_pretrained(path)` work as is:
    diffusers upcasts half-precision weights when loading without `torch_dtype` but transformers
    keeps the text encoder's, and a bf16 text encoder then feeds an fp32 UNet. fp32 also keeps the
    erased weights exactly; `torch_dtype=torch.float16` casts everything on load.
    """
    components = {**pipe.components, "unet": unet}
    StableDiffusionPipeline(**{name: _in_fp32(module) for name, module in components.items()}).save_pretrained(
        path, safe_serialization=True
    )


def _in_fp32(module):
    if not isinstance(module, torch.nn.Module) or module.dtype == torch.float32:
        return module
    return cast_copy(module, torch.float32)


def cast_copy(module: torch.nn.Module, dtype: torch.dtype, device: torch.device | str | None = None):
    """A frozen copy of `module` with its floating tensors in `dtype` (on `device`, default: where each is).

    Tensors are cast one by one while copying, so no second copy at the original precision exists in
    between (for SD 1.4's UNet that is 1.7-3.4 GB on the GPU).
    """
    memo = {id(t): _cast(t, dtype, device) for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo=memo)


def _cast(tensor: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    out = tensor.detach().to(device or tensor.device, dtype if tensor.is_floating_point() else tensor.dtype,
                             copy=True)
    return torch.nn.Parameter(out, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else out


def _save_lora(unet, path: Path) -> None:
    from peft.utils import get_peft_model_state_dict

    if not has_lora(unet):
        raise ValueError("export format 'lora' needs a UNet with a LoRA adapter (method.lora.enabled=true)")
    layers = get_peft_model_state_dict(unet)  # peft key names, as diffusers' loader expects
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    metadata = unet.peft_config["default"].to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is moved aside first and removed after."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Reading an export back (the inverse of export_erased)
# ----------------------------------------------------------------------------------------------
def apply_export(pipe, folder: str | Path) -> str:
    """Load an export folder of ours into `pipe.unet`; returns which part was read (unet, pipeline, delta, lora)."""
    folder = Path(folder)
    if (folder / "unet").is_dir():
        load_unet_weights(pipe.unet, folder / "unet")
        return "unet"
    if (folder / "pipeline" / "unet").is_dir():
        load_unet_weights(pipe.unet, folder / "pipeline" / "unet")
        return "pipeline"
    if (folder / "delta.safetensors").is_file():
        load_unet_weights(pipe.unet, folder / "delta.safetensors")
        return "delta"
    if (folder / "lora").is_dir():
        pipe.load_lora_weights(str(folder / "lora"))
        return "lora"
    raise ModelLoadError(f"{folder} is not a stereo export folder: expected unet/, pipeline/, delta.safetensors "
                         "or lora/ (as written by `python train.py`, see stereo/export.py)")


def materialise_unet(folder: str | Path, dest: str | Path) -> Path:
    """Write a diffusers `unet/` folder to `dest` for an export that holds only `delta.safetensors` or `lora/`.

    The base model is loaded as the run loaded it (the model config in the export's manifest.json),
    its UNet cast to fp32 as the run's student was (`stereo.erasure.subsets.make_student`), then the
    export is applied (a LoRA adapter is fused): the UNet the run would have saved as `unet/`.
    """
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    pipe = load_pipeline(OmegaConf.merge(OmegaConf.structured(ModelConfig), manifest["config"]["model"]))
    pipe.unet.float()
    if apply_export(pipe, folder) == "lora":
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    pipe.unet.save_pretrained(dest, safe_serialization=True)
    return Path(dest)
