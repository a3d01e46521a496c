"""Typed configuration schemas, registered in Hydra's ConfigStore.

Every YAML under `conf/` is validated against these dataclasses when it is composed, so a
misspelled key (`trainer.stpes=4`) fails at compose time instead of being silently ignored.
Cross-field rules live in `validate(cfg)` and name the offending values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

MODEL_KINDS = ("sd14", "sd14-random", "tiny", "toy", "pretrained")
DTYPES = ("fp32", "fp16", "bf16")
MIXED_PRECISION = ("no", "fp16", "bf16")
SUBSETS = ("xattn", "noxattn", "selfattn", "full")
LOGGERS = ("none", "wandb")
WANDB_MODES = ("online", "offline", "disabled")
EXPORT_FORMATS = ("unet", "pipeline", "delta", "lora")
METHODS = ("esd", "reo", "stereo")
STAGES = ("all", "ste", "reo")


@dataclass
class ModelConfig:
    """Which base model to load. `pretrained` is a hub id, a local diffusers folder, or a
    single-file checkpoint (.ckpt/.safetensors) that needs `single_file_config`."""

    kind: str = "tiny"
    pretrained: Optional[str] = None
    revision: Optional[str] = None
    single_file_config: Optional[str] = None  # local diffusers folder holding the component configs
    dtype: str = "fp32"  # dtype of the frozen parts (teacher, text encoder, VAE)
    device: str = "auto"  # auto (accelerate's choice: the process's GPU if any) | cpu
    resolution: int = 512  # image size in pixels used when sampling x_t
    unet_weights: Optional[str] = None  # a third-party erased UNet to load on top (.pt/.safetensors/folder)
    seed: int = 0  # random init of tiny / sd14-random


@dataclass
class ConceptConfig:
    """One concept to erase: its prompt text(s) and what later stages need to know about it."""

    name: str = MISSING
    prompts: list[str] = field(default_factory=list)  # erase all of these (balanced)
    kind: str = "object"  # object | style | nudity — selects TI templates and detectors
    subset: str = "noxattn"  # ESD's recommendation: xattn for styles, noxattn otherwise
    synonyms: list[str] = field(default_factory=list)
    initializer_token: str = "object"  # textual-inversion init word ("person", "object", "art")
    inversion_templates: list[str] = field(default_factory=list)  # empty -> by kind
    anchors: Optional[str] = None  # built-in anchor set name or a file of anchor prompts
    gallery_prompts: list[str] = field(default_factory=list)  # prompts that depict the concept
    detector: dict[str, Any] = field(default_factory=dict)  # detector name + settings for evaluation
    eval_prompts: Optional[str] = None  # built-in prompt set name or file


@dataclass
class LoRAConfig:
    enabled: bool = False
    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0


@dataclass
class InversionConfig:
    """The attack inside STE: concept inversion (textual inversion) or soft-prompt PGD."""

    method: str = "ti"  # ti | pgd
    steps: int = 3000
    lr: float = 5e-3
    batch_size: int = 1
    num_vectors: int = 1
    pgd_eps: float = 0.1
    templates: list[str] = field(default_factory=list)  # empty -> by concept kind (object/style/nudity)


@dataclass
class STEConfig:
    """Stage 1, Search Thoroughly Enough: K rounds of erase -> attack (STEREO.md)."""

    rounds: int = 4
    erase_steps: int = 200
    erase_lr: float = 5e-6
    erase_eta: float = 1.0
    erase_all_found: bool = True  # each round erases every embedding found so far (stereo_reference: latest only)
    gallery_size: int = 500
    gallery_split: bool = True  # split the gallery across rounds (reference) or share it
    gallery_steps: int = 50
    gallery_guidance: float = 7.5
    inversion: InversionConfig = field(default_factory=InversionConfig)


@dataclass
class REOConfig:
    """Stage 2, Robustly Erase Once: eps* = eps(∅) + eta_a (eps(a) - eps(∅)) - eta_n mean_n(eps(n) - eps(∅))."""

    steps: int = 200
    lr: float = 2e-5
    eta_a: float = 1.0
    eta_n: float = 3.0
    anchors_per_step: int = 1
    num_anchors: Optional[int] = None  # None -> every anchor of the set
    adversarial: str = "all"  # which STE embeddings become negatives: all | last | none


@dataclass
class MethodConfig:
    """The erasure method: `esd`, `reo` (concept only), or `stereo` (STE then REO)."""

    name: str = "esd"
    eta: float = 1.0  # ESD guidance: eps* = eps(∅) - eta (eps(c) - eps(∅))
    subset: Optional[str] = None  # None -> the concept's default subset
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    ddim_steps: int = 50  # DDIM grid used to sample x_t
    sample_guidance: float = 3.0  # CFG scale while sampling x_t from the student
    stage: str = "all"  # stereo: all | ste | reo
    ste_dir: Optional[str] = None  # stage=reo: a finished STE folder whose embeddings to use
    ste: STEConfig = field(default_factory=STEConfig)
    reo: REOConfig = field(default_factory=REOConfig)


@dataclass
class TrainerConfig:
    steps: int = 200
    lr: float = 1e-5
    weight_decay: float = 0.0
    batch_size: int = 1  # x_t latents per step per process
    grad_accum: int = 1
    max_grad_norm: Optional[float] = None
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0  # 0 = never (a final export still happens)
    checkpoints_total_limit: int = 2  # newest checkpoints kept (0 = keep all)
    resume: bool = False
    log_every: int = 1
    sample_every: int = 0  # 0 = only at the end (if logger asks for samples)
    sample_steps: int = 25
    sample_guidance: float = 7.5
    cpu: bool = False  # force CPU (also for multi-process gloo runs on CPU)
    dist_timeout_minutes: int = 60  # how long a collective waits for the other processes


@dataclass
class LoggerConfig:
    name: str = "none"
    project: str = "stereo"
    mode: str = "offline"  # wandb mode: online | offline | disabled
    log_images: bool = True


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=lambda: ["unet", "delta"])  # + pipeline, lora


@dataclass
class StereoConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    concepts: dict[str, ConceptConfig] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    seed: int = 0
    output_dir: str = "outputs"
    extras: dict[str, Any] = field(default_factory=dict)  # free-form notes for experiments


def register_configs() -> None:
    """Register the schema as `stereo_schema`; `conf/train.yaml` lists it first in its defaults."""
    ConfigStore.instance().store(name="stereo_schema", node=StereoConfig)


def check_choice(value: Any, valid: tuple[str, ...], key: str) -> None:
    """A ValueError naming the key, the bad value and the valid ones, unless `value` is one of `valid`."""
    if value not in valid:
        raise ValueError(f"{key}={value!r} is not valid; choose one of {', '.join(valid)}")


def validate(cfg: DictConfig | StereoConfig) -> None:
    """Cross-field rules the types cannot express. Raises ValueError naming the bad values."""
    check_choice(cfg.method.name, METHODS, "method.name")
    check_choice(cfg.model.kind, MODEL_KINDS, "model.kind")
    check_choice(cfg.model.dtype, DTYPES, "model.dtype")
    check_choice(cfg.model.device, ("auto", "cpu"), "model.device")
    check_choice(cfg.trainer.mixed_precision, MIXED_PRECISION, "trainer.mixed_precision")
    check_choice(cfg.logger.name, LOGGERS, "logger.name")
    check_choice(cfg.logger.mode, WANDB_MODES, "logger.mode")
    for fmt in cfg.export.formats:
        check_choice(fmt, EXPORT_FORMATS, "export.formats[]")
    if not cfg.concepts:
        raise ValueError("no concept selected: pass concept=NAME (or concept=[a,b]); see conf/concept/")
    for key, concept in cfg.concepts.items():
        if not concept.prompts:
            raise ValueError(f"concept {key!r} has no prompts; set concepts.{key}.prompts")
    subsets = {c.subset for c in cfg.concepts.values()} if cfg.method.subset is None else {cfg.method.subset}
    for subset in subsets:
        check_choice(subset, SUBSETS, "method.subset")
    if len(subsets) > 1:
        raise ValueError(
            f"the selected concepts default to different parameter subsets {sorted(subsets)}; "
            "set method.subset explicitly"
        )
    if "lora" in cfg.export.formats and not cfg.method.lora.enabled:
        raise ValueError("export.formats includes 'lora' but method.lora.enabled=false")
    if cfg.method.lora.enabled and ("delta" in cfg.export.formats):
        raise ValueError("with method.lora.enabled=true export 'lora' (the adapter), not 'delta'")
    if cfg.trainer.steps < 1 or cfg.trainer.batch_size < 1 or cfg.trainer.grad_accum < 1:
        raise ValueError(
            f"trainer.steps={cfg.trainer.steps}, batch_size={cfg.trainer.batch_size}, "
            f"grad_accum={cfg.trainer.grad_accum} must all be >= 1"
        )
    check_choice(cfg.method.stage, STAGES, "method.stage")
    check_choice(cfg.method.reo.adversarial, ("all", "last", "none"), "method.reo.adversarial")
    check_choice(cfg.method.ste.inversion.method, ("ti", "pgd"), "method.ste.inversion.method")
    if cfg.method.stage != "all" and cfg.method.name != "stereo":
        raise ValueError(f"method.stage={cfg.method.stage} only applies to method.name=stereo")
    if cfg.method.stage == "reo" and not cfg.method.ste_dir:
        raise ValueError("method.stage=reo needs method.ste_dir=<a finished STE run folder>")
    if cfg.method.ste.rounds < 1 or cfg.method.reo.anchors_per_step < 1:
        raise ValueError(f"method.ste.rounds={cfg.method.ste.rounds} and method.reo.anchors_per_step="
                         f"{cfg.method.reo.anchors_per_step} must be >= 1")
    if cfg.trainer.checkpoints_total_limit < 0 or cfg.trainer.dist_timeout_minutes < 1:
        raise ValueError(f"trainer.checkpoints_total_limit={cfg.trainer.checkpoints_total_limit} must be >= 0 "
                         f"(0 = keep all) and trainer.dist_timeout_minutes={cfg.trainer.dist_timeout_minutes} >= 1")
    if not 1 <= cfg.method.ddim_steps <= 1000:
        raise ValueError(f"method.ddim_steps={cfg.method.ddim_steps} must be in [1, 1000]")


def erased_subset(cfg: DictConfig | StereoConfig) -> str:
    """The parameter subset this run trains (method.subset, else the concepts' shared default)."""
    if cfg.method.subset is not None:
        return cfg.method.subset
    return next(iter(cfg.concepts.values())).subset


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """The real config tree composed like `python train.py <overrides>` (for tests, benchmarks, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))
