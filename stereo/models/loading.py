"""One loader for every base model and every erased-UNet format.

`load_pipeline(cfg.model)` gives a pipeline (safety checker off) from:
- `tiny` / `sd14-random` / `sd21-random` / `sdxl-random`: built from configs with seeded random weights, offline;
- `toy`: the toy world's committed pipeline folder (`stereo/toy/weights/pipeline`);
- `sd14`, `sd15`, `sd21`, `sd21-base`, `sdxl` / `pretrained`: a hub id, a local diffusers folder, or a
  single-file checkpoint. The pipeline class is the one the folder's (or repo's) `model_index.json`
  names, StableDiffusionPipeline or StableDiffusionXLPipeline; a family kind also checks that the
  class is its own, so `model=sdxl` on an SD 1.x folder fails at load, not mid-run.
Offline and not cached, a hub id fails within seconds with a message that says what was looked
for and how to provide it. `load_unet_weights` puts a third-party erased UNet on top.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from stereo.models import assemble_pipeline
from stereo.models.families import (
    SD21_SCHEDULER_CONFIG,
    SDXL_SCHEDULER_CONFIG,
    scheduler_from,
)
from stereo.models.tiny import load_clip_tokenizer, sd_scheduler, tiny_pipeline

SD14_CONFIGS = Path(__file__).parent / "configs" / "sd14"
SD21_CONFIGS = Path(__file__).parent / "configs" / "sd21"  # stabilityai/stable-diffusion-2-1's, as published
SDXL_CONFIGS = Path(__file__).parent / "configs" / "sdxl"  # stabilityai/stable-diffusion-xl-base-1.0's, as published
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TORCH_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# What every loaded base model is: one of the two pipeline classes stereo drives.
Pipeline = StableDiffusionPipeline | StableDiffusionXLPipeline
PIPELINE_CLASSES = {cls.__name__: cls for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline)}
# The kinds loaded from `pretrained`, and the class each expects (None: whatever model_index.json names).
PRETRAINED_KINDS = {
    "sd14": StableDiffusionPipeline, "sd15": StableDiffusionPipeline, "sd21": StableDiffusionPipeline,
    "sd21-base": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "pretrained": None,
}
BUILT_KINDS = ("tiny", "sd14-random", "toy", "sd21-random", "sdxl-random")
RANDOM_KINDS = ("tiny", "sd14-random", "sd21-random", "sdxl-random")  # built in fp32, then cast


class ModelLoadError(RuntimeError):
    """A model or checkpoint could not be loaded; the message says what was looked for and how to fix it."""


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not valid; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_pipeline(model_cfg) -> Pipeline:
    """The base pipeline described by a `ModelConfig`, on CPU, frozen parts in `model_cfg.dtype`."""
    dtype = torch_dtype(model_cfg.dtype)
    kind = model_cfg.kind
    if kind == "tiny":
        pipe = tiny_pipeline(seed=model_cfg.seed)
    elif kind == "sd14-random":
        pipe = sd14_random_pipeline(seed=model_cfg.seed)
    elif kind == "sd21-random":
        pipe = sd21_random_pipeline(seed=model_cfg.seed)
    elif kind == "sdxl-random":
        pipe = sdxl_random_pipeline(seed=model_cfg.seed)
    elif kind == "toy":
        pipe = _from_local_folder(_toy_pipeline_dir(), dtype)
    elif kind in PRETRAINED_KINDS:
        if not model_cfg.pretrained:
            raise ModelLoadError(f"model.kind={kind} needs model.pretrained (a hub id or a local path)")
        pipe = load_pretrained(model_cfg.pretrained, model_cfg.revision, dtype, model_cfg.single_file_config,
                               kind=str(kind))
    else:
        raise ValueError(f"model.kind={kind!r} is not valid; choose one of "
                         f"{', '.join((*BUILT_KINDS, *PRETRAINED_KINDS))}")
    if kind in RANDOM_KINDS:  # built in fp32; hub/local loads already used torch_dtype
        pipe.to(dtype=dtype)
    if model_cfg.unet_weights:
        load_unet_weights(pipe.unet, model_cfg.unet_weights)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pretrained(
    source: str, revision: str | None, dtype: torch.dtype, single_file_config: str | None = None,
    kind: str = "pretrained",
) -> Pipeline:
    """A pipeline from a local diffusers folder, a local single-file checkpoint, or a hub id.

    Folders and hub repos load as the class their model_index.json names; a family `kind` (sd14 ... sdxl)
    refuses another family's class before any weights are read, and is the class a single-file
    checkpoint is read as when `single_file_config` has no model_index.json.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_local_folder(path, dtype, kind)
    if path.is_file():
        return _from_single_file(path, dtype, single_file_config, kind)
    if looks_like_path(source):
        raise ModelLoadError(
            f"model path {source!r} does not exist and is not a hub id of the form 'org/name'. "
            "Give a local diffusers folder, a .safetensors/.ckpt file, or a hub id such as "
            "CompVis/stable-diffusion-v1-4."
        )
    return _from_hub(source, revision, dtype, kind)


def pipeline_class(model_index: dict, where: str, kind: str = "pretrained") -> type:
    """The pipeline class a model_index.json names, if stereo drives it and it is `kind`'s."""
    name = model_index.get("_class_name")
    if name not in PIPELINE_CLASSES:
        raise ModelLoadError(
            f"{where} holds a {name or 'pipeline without _class_name'}; stereo loads "
            f"{' and '.join(PIPELINE_CLASSES)} (SD 1.x, SD 2.x, SDXL)."
        )
    expected = PRETRAINED_KINDS.get(kind)
    if expected is not None and PIPELINE_CLASSES[name] is not expected:
        raise ModelLoadError(
            f"model.kind={kind} expects a {expected.__name__}, but {where} holds a {name}; pick the model kind "
            "of that family (or model.kind=pretrained)."
        )
    return PIPELINE_CLASSES[name]


def _pipeline_kwargs(cls: type, dtype: torch.dtype) -> dict:
    """from_pretrained's keywords: the safety checker off where the class has one (SDXL has none)."""
    if cls is StableDiffusionPipeline:
        return {"torch_dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
    return {"torch_dtype": dtype}


def _from_local_folder(path: Path, dtype: torch.dtype, kind: str = "pretrained") -> Pipeline:
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"{path} is not a diffusers pipeline folder (no model_index.json). Point model.pretrained at "
            "the folder made by a pipeline's save_pretrained or `hf download REPO --local-dir FOLDER`."
        )
    cls = pipeline_class(json.loads(index.read_text()), str(path), kind)
    try:
        return cls.from_pretrained(path, local_files_only=True, **_pipeline_kwargs(cls, dtype))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the pipeline folder {path}: {err}") from err


def _from_single_file(path: Path, dtype: torch.dtype, config_dir: str | None, kind: str) -> Pipeline:
    if config_dir is None or not Path(config_dir).is_dir():
        raise ModelLoadError(
            f"{path} is a single-file checkpoint; loading it offline needs the component configs. Set "
            "model.single_file_config to a local diffusers folder of the same architecture (a download of "
            "the family's repo without weights is enough, e.g. `hf download stabilityai/stable-diffusion-xl-base-1.0 "
            "--exclude '*.safetensors' '*.bin' --local-dir DIR` for SDXL, CompVis/stable-diffusion-v1-4 for SD 1.4)."
        )
    index = Path(config_dir) / "model_index.json"
    if index.is_file():
        cls = pipeline_class(json.loads(index.read_text()), config_dir, kind)
    else:
        cls = PRETRAINED_KINDS.get(kind) or StableDiffusionPipeline
    try:
        return cls.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                    **_pipeline_kwargs(cls, dtype))
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(f"could not load the single-file checkpoint {path} as {cls.__name__}: {err}") from err


def looks_like_path(source: str) -> bool:
    """True when `source` cannot be a hub id "org/name" (so a missing `source` is a missing local path)."""
    return source.startswith(("/", ".", "~")) or source.count("/") != 1


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint (`HF_ENDPOINT`, default huggingface.co) accepts a connection."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_hub(repo_id: str, revision: str | None, dtype: torch.dtype, kind: str) -> Pipeline:
    try:  # a populated HF cache needs no network
        return _hub_pipeline(repo_id, revision, dtype, kind, local_files_only=True)
    except (OSError, ValueError):
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline or not hub_reachable():
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is unreachable"
        local = f"/path/{repo_id.split('/')[1]}"
        raise ModelLoadError(
            f"{repo_id} (revision {revision or 'main'}) is not in the local HF cache ({cache}) and {why}. "
            f"Either download it where there is network (`hf download {repo_id} --local-dir {local}`) and pass "
            f"model.pretrained={local}, or copy a populated HF cache and set HF_HOME to it."
        )
    try:
        return _hub_pipeline(repo_id, revision, dtype, kind)
    except OSError as err:
        raise ModelLoadError(f"could not download {repo_id} (revision {revision or 'main'}): {err}") from err


def _hub_pipeline(repo_id: str, revision: str | None, dtype: torch.dtype, kind: str, **download) -> Pipeline:
    """The pipeline of a hub repo as its model_index.json's class (checked against `kind`)."""
    cls = pipeline_class(DiffusionPipeline.load_config(repo_id, revision=revision, **download), repo_id, kind)
    return cls.from_pretrained(repo_id, revision=revision, **download, **_pipeline_kwargs(cls, dtype))


def _toy_pipeline_dir() -> Path:
    # The committed folder of `stereo.toy` (its TOY_WEIGHTS_DIR), found by path: models must not import
    # the toy world, which builds on them.
    path = Path(__file__).resolve().parent.parent / "toy" / "weights" / "pipeline"
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(
            f"the toy model's weights are missing from {path}; regenerate them with "
            "`python -m stereo.toy.pretrain` (or reinstall the package)."
        )
    return path


def sd14_random_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Full SD 1.4 architecture with random weights (no download): UNet 860 M, ViT-L/14 text tower, VAE.

    The tokenizer is the package's truncated CLIP BPE; the text encoder keeps CLIP's 49,408-row
    embedding table so parameter counts and memory match SD 1.4.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(_read_json("unet.json"))
    vae = AutoencoderKL.from_config(_read_json("vae.json"))
    text_encoder = CLIPTextModel(CLIPTextConfig(**_read_json("text_encoder.json")))
    return assemble_pipeline(vae=vae, text_encoder=text_encoder, tokenizer=load_clip_tokenizer(), unet=unet,
                             scheduler=sd_scheduler())


def sd21_random_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Full SD 2.1 architecture with random weights (no download): UNet 866 M (linear projections, 1024-wide
    cross-attention), OpenCLIP ViT-H text tower (23 of its 24 layers, as SD 2 ships it), VAE; DDIM v-prediction.
    The tokenizer is the truncated CLIP BPE padding with "!", as SD 2's."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(read_config("unet.json", SD21_CONFIGS))
    vae = AutoencoderKL.from_config(read_config("vae.json", SD21_CONFIGS))
    text_encoder = CLIPTextModel(CLIPTextConfig(**read_config("text_encoder.json", SD21_CONFIGS)))
    with torch.device("cpu"):  # the scheduler's tables stay real when the models are built on meta
        scheduler = scheduler_from(SD21_SCHEDULER_CONFIG)
    return assemble_pipeline(vae=vae, text_encoder=text_encoder, tokenizer=load_clip_tokenizer("!"), unet=unet,
                             scheduler=scheduler)


def sdxl_random_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """Full SDXL base architecture with random weights (no download): UNet 2.6 B, CLIP ViT-L/14 and OpenCLIP
    bigG text towers (123 M + 695 M), VAE (scaling 0.13025); Euler as SDXL publishes it.

    Both tokenizers are the package's truncated CLIP BPE (tokenizer_2 pads with "!", as SDXL's); the
    text towers keep CLIP's 49,408-row embedding tables so parameter counts and memory match SDXL.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(read_config("unet.json", SDXL_CONFIGS))
    vae = AutoencoderKL.from_config(read_config("vae.json", SDXL_CONFIGS))
    text_encoder = CLIPTextModel(CLIPTextConfig(**read_config("text_encoder.json", SDXL_CONFIGS)))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**read_config("text_encoder_2.json", SDXL_CONFIGS)))
    with torch.device("cpu"):  # the scheduler's tables stay real when the models are built on meta
        scheduler = scheduler_from(SDXL_SCHEDULER_CONFIG)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=load_clip_tokenizer(),
        tokenizer_2=load_clip_tokenizer("!"), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def _read_json(name: str) -> dict:
    return read_config(name, SD14_CONFIGS)


def read_config(name: str, folder: Path = SD14_CONFIGS) -> dict:
    """A component config of `folder` (configs/sd14, configs/sd21 or configs/sdxl) as keyword arguments."""
    config = json.loads((folder / name).read_text())
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}


# --------------------------------------------------------------------------------------------
# Third-party erased UNets
# --------------------------------------------------------------------------------------------
def read_unet_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Tensors of an erased UNet and whether they claim to be complete.

    `.pt/.pth/.bin/.ckpt`: a plain state dict (as STEREO's reference code saves it), read with
    `weights_only=True` so no pickle code runs; `.safetensors`: a trained subset (ESD style) or a
    full UNet; a folder: a diffusers UNet (`config.json` + weights).
    """
    return read_state_dict(path, "erased UNet", ("diffusion_pytorch_model.safetensors",
                                                 "unet/diffusion_pytorch_model.safetensors"), ("module.", "unet."))


def read_state_dict(path: str | Path, what: str, folder_files: tuple[str, ...],
                    prefixes: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], bool]:
    """{name: tensor} of a third-party checkpoint of one component (`what`) and whether it claims to be complete.

    A folder: the first of `folder_files` it holds (complete); `.safetensors`: maybe a trained subset;
    `.pt/.pth/.bin/.ckpt`: a state dict (complete), read with `weights_only=True`, so no pickle code runs.
    Names lose the `prefixes` a training script wrapped them in (`module.` of DDP, the component's name).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{what} weights not found: {path}")
    if path.is_dir():
        found = next((path / name for name in folder_files if (path / name).is_file()), None)
        if found is None:
            raise ModelLoadError(f"{path} holds none of {', '.join(folder_files)} (the {what}'s diffusers folder)")
        return _read_tensors(found, prefixes), True
    if path.suffix == ".safetensors":
        return _read_tensors(path, prefixes), False
    if path.suffix in TORCH_CHECKPOINT_SUFFIXES:
        return _read_tensors(path, prefixes), True
    raise ModelLoadError(f"unknown {what} format {path.suffix!r} for {path}; use a diffusers folder, .safetensors, "
                         f"or one of {', '.join(TORCH_CHECKPOINT_SUFFIXES)}")


def _read_tensors(path: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, or a pickle that weights_only refuses to execute
        raise ModelLoadError(
            f"could not read {path} as a tensor state dict ({type(err).__name__}: {err}). It is corrupt, "
            "or it holds pickled objects that stereo refuses to execute (weights_only=True)."
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path} does not hold a flat {{name: tensor}} state dict")
    return {_strip_prefix(k, prefixes): v for k, v in state.items()}


def _strip_prefix(key: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def load_unet_weights(unet: UNet2DConditionModel, path: str | Path) -> list[str]:
    """Overwrite `unet`'s tensors with an erased UNet's; returns the names loaded.

    Unknown names, missing names (for a complete checkpoint) or shape mismatches raise an
    error that lists a few of them, so a checkpoint of another architecture cannot load silently.
    """
    state, complete = read_unet_state_dict(path)
    return load_matching(unet, state, complete, path, "UNet", "Is it a diffusers-format UNet of the same architecture?")


def load_matching(module: torch.nn.Module, state: dict[str, torch.Tensor], complete: bool, path, what: str,
                  hint: str, *, require_tensors: bool = False) -> list[str]:
    """Load a checkpoint's tensors into `module` after checking they are its own: unknown names, missing names
    (for a `complete` checkpoint), shape mismatches (and, with `require_tensors`, no tensors at all) raise an
    error that lists a few of them and ends with `hint`. Returns the names loaded."""
    own = module.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state)) if complete else []
    shapes = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
    empty = require_tensors and not state
    if unexpected or missing or shapes or empty:
        raise ModelLoadError(
            f"{path} does not match this {what}: {len(unexpected)} unexpected keys {unexpected[:5]}, "
            f"{len(missing)} missing keys {missing[:5]}, {len(shapes)} shape mismatches {shapes[:5]}"
            f"{', no tensors at all' if empty else ''}. {hint}"
        )
    module.load_state_dict(state, strict=False)
    return sorted(state)
