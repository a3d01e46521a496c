"""What a user does with a rehearsed run's outputs, shared by tests/test_rehearsal*.py.

A rehearsal passes only if the run finished AND what it left is usable the documented way:
exports load into diffusers and generate, sample grids are real PNGs, tokens load with
`pipe.load_textual_inversion`. Commands run as a user runs them: `python train.py ...` in a
fresh working directory (subprocess), or `train(compose(...))` in process for the cheaper ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
RESOLUTION = 64  # the rehearsal model's native size (stereo.models.rehearsal.RESOLUTION)


class Killed(BaseException):
    """Raised through a seam to stop a run abruptly, like SIGKILL: no `except Exception` catches it."""


def environment(**extra: str) -> dict[str, str]:
    """The subprocess environment: offline, no wandb, one thread per process (2 shared cores)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "HYDRA_FULL_ERROR": "1", **extra}


def run_cli(args: list[str], cwd: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    """Run a command as a user would (cwd = a fresh folder); fail with the end of its stderr if it fails."""
    proc = subprocess.run(args, cwd=cwd, env=environment(**env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def python_cli(script: str, *overrides: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python <repo>/<script> <overrides>` from `cwd`."""
    return run_cli([sys.executable, str(ROOT / script), *overrides], cwd=cwd, timeout=timeout)


def launch_two(script: str, *overrides: str, cwd: Path, port: int, launcher: str = "accelerate",
               timeout: int = 900) -> subprocess.CompletedProcess:
    """Two real gloo processes on CPU (ENVIRONMENT.md), rank r starting r * 1.1 s late (staggered_entry.py),
    so that `${now:...}` differs between ranks unless the run agrees on one output folder."""
    entry = [str(ROOT / "tests" / "scripts" / "staggered_entry.py"), str(ROOT / script), *overrides]
    if launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), *entry]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               *entry]
    return run_cli(cmd, cwd=cwd, timeout=timeout, ACCELERATE_USE_CPU="true")


def run_folders(root: Path) -> list[Path]:
    """Folders under `root` (any depth) holding something besides Hydra's own bookkeeping."""
    bookkeeping = {".hydra", "train.log", "evaluate.log", "staggered_entry.log"}
    return sorted(d for d in root.rglob("*") if d.is_dir() and d.name != ".hydra"
                  and any(p.is_file() and p.name not in bookkeeping for p in d.iterdir()))


def only_run_folder(root: Path, marker: str) -> Path:
    """The one folder under `root` that holds `marker` (e.g. run.json); fails if the ranks split the run."""
    found = sorted({p.parent for p in root.rglob(marker) if ".hydra" not in p.parts})
    assert len(found) == 1, f"expected one output folder with {marker} under {root}, got {found}"
    run = found[0]
    strays = {run.parent / d.relative_to(run.parent).parts[0] if d.is_relative_to(run.parent) else d
              for d in run_folders(root) if not d.is_relative_to(run) and not run.is_relative_to(d)}
    assert not strays, f"the ranks split the run: {run} and {sorted(strays)} (rank-dependent output_dir?)"
    return run


# --- outputs a user loads ------------------------------------------------------------------------
def assert_grids(run_dir: Path, pattern: str = "samples/*.png") -> list[Path]:
    """Sample grids exist and are readable, non-empty images."""
    grids = sorted(run_dir.glob(pattern))
    assert grids, f"no sample grid {pattern} in {run_dir}"
    for path in grids:
        with Image.open(path) as image:
            assert image.width >= RESOLUTION and image.height >= RESOLUTION, path
    return grids


def assert_finite_image(pipe, prompt: str = "a photo") -> None:
    """Two denoising steps at 64 px give a finite image."""
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, num_inference_steps=2, height=RESOLUTION, width=RESOLUTION, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert np.isfinite(out.images).all()


def pipeline_class(folder: Path):
    """The diffusers class a pipeline folder's model_index.json names (SD 1.x/2.x or SDXL), as a user's
    `DiffusionPipeline.from_pretrained` would pick it."""
    import diffusers

    return getattr(diffusers, json.loads((folder / "model_index.json").read_text())["_class_name"])


def base_pipeline(base_dir: Path, **components):
    cls = pipeline_class(base_dir)
    no_checker = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in \
        json.loads((base_dir / "model_index.json").read_text()) else {}
    return cls.from_pretrained(base_dir, torch_dtype=torch.float32, **no_checker, **components)


def assert_export_loads(base_dir: Path, export: Path) -> dict[str, object]:
    """Every format in `export/manifest.json` loads the README's way and generates; returns the loaded pieces."""
    from diffusers import UNet2DConditionModel

    from stereo.models.loading import load_unet_weights

    manifest = json.loads((export / "manifest.json").read_text())
    for name in manifest["files"]:
        assert (export / name).is_file(), f"manifest lists {name} but {export} lacks it"
    loaded: dict[str, object] = {}
    if (export / "unet").is_dir():
        unet = UNet2DConditionModel.from_pretrained(export / "unet", torch_dtype=torch.float32)
        pipe = base_pipeline(base_dir, unet=unet)
        assert_finite_image(pipe)
        loaded["unet"] = unet
    if (export / "delta.safetensors").is_file():
        pipe = base_pipeline(base_dir)
        load_unet_weights(pipe.unet, export / "delta.safetensors")
        delta = load_file(str(export / "delta.safetensors"))
        if "unet" in loaded:  # the delta applied to the base equals the exported UNet on the trained tensors
            full = loaded["unet"].state_dict()
            for key, value in delta.items():
                assert torch.equal(full[key].float(), value.float()), key
        loaded["delta"] = delta
    if (export / "pipeline").is_dir():
        pipe = pipeline_class(export / "pipeline").from_pretrained(export / "pipeline", torch_dtype=torch.float32)
        assert_finite_image(pipe)
        loaded["pipeline"] = pipe
    if (export / "lora").is_dir():
        pipe = base_pipeline(base_dir)
        pipe.load_lora_weights(export / "lora")
        assert_finite_image(pipe)
        loaded["lora"] = True
    assert loaded, f"{export} holds no loadable format"
    return loaded


def assert_token_loads(base_dir: Path, token_file: Path) -> str:
    """An STE token file loads with `pipe.load_textual_inversion` and its prompt generates."""
    pipe = base_pipeline(base_dir)
    state = load_file(str(token_file))
    if hasattr(pipe, "text_encoder_2"):  # SDXL: diffusers' two-tower file, loaded tower by tower
        from stereo.attacks.learned_token import load_token

        token = load_token(token_file).token  # the name is in the file's metadata
        pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    else:
        (token,) = state.keys()
        pipe.load_textual_inversion(str(token_file))
    assert_finite_image(pipe, f"a photo of {token}")
    return token


def assert_same_tensors(a: Path, b: Path) -> None:
    """Two safetensors files hold exactly the same tensors (names, dtypes, values)."""
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys(), (a, b)
    different = [k for k in left if left[k].dtype != right[k].dtype or not torch.equal(left[k], right[k])]
    assert not different, f"{a} and {b} differ in {different[:5]} ({len(different)} tensors)"


def ste_tokens(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "ste" / "tokens.json").read_text())
