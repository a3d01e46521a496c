"""Trainer checkpoints: `checkpoints/step_N/` holds the trainable tensors, their optimiser state and the step.

The frozen weights are not saved: they come back from the base model. A checkpoint is written into
a hidden `.tmp_step_N` folder and made visible by one rename, with `checkpoint.json` written last,
so a killed run never leaves a half-written checkpoint that a resume would pick up.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DONE = "checkpoint.json"  # written last: a folder with it is a finished checkpoint
TENSORS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"


def save_checkpoint(root: Path, step: int, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    grad_scaler=None, keep: int | None = None) -> Path:
    """Write `root/step_N` atomically, then keep only the newest `keep` checkpoints (0 or None: all)."""
    final, tmp = root / f"step_{step:07d}", root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, tmp / TENSORS)
    scaler = grad_scaler.state_dict() if grad_scaler is not None else None  # fp16 loss scale
    torch.save({"optimizer": optimizer.state_dict(), "grad_scaler": scaler}, tmp / OPTIMIZER)
    (tmp / DONE).write_text(json.dumps({"step": step}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if keep:
        for old in sorted(root.glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path | None) -> Path | None:
    """The newest finished checkpoint under `root`, or None."""
    if root is None or not root.is_dir():
        return None
    done = [p for p in sorted(root.glob("step_*")) if (p / DONE).is_file()]
    return done[-1] if done else None


def checkpoint_step(folder: Path) -> int:
    return json.loads((folder / DONE).read_text())["step"]


def load_checkpoint(folder: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    grad_scaler=None) -> None:
    """Copy the saved tensors into `params` and restore the optimiser (and fp16 loss scale) state.

    Weights are read with safetensors and the optimiser state with `weights_only=True`: a checkpoint
    never executes code. Fails naming the mismatch when the checkpoint was written with other settings.
    """
    if not (folder / TENSORS).is_file():
        raise ValueError(f"{folder} has no {TENSORS}: it was written by an older version (accelerate "
                         "state); resume with that version, or start a new output_dir")
    tensors = load_file(folder / TENSORS)
    if tensors.keys() != params.keys():
        raise ValueError(
            f"{folder} holds {len(tensors)} trainable tensors that do not match this run's {len(params)} "
            f"(e.g. {sorted(tensors.keys() ^ params.keys())[:3]}): it was written with another parameter "
            "subset or LoRA setting. Resume with the same method settings, or start a new output_dir."
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    state = torch.load(folder / OPTIMIZER, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if state["grad_scaler"] is not None and grad_scaler is not None:
        grad_scaler.load_state_dict(state["grad_scaler"])
