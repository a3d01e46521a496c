"""Typed schemas of `evaluate.py` (conf/evaluate.yaml), registered in Hydra's ConfigStore.

An evaluation crosses several evaluated models with several attacks on one concept:
    models:  {label: EvaluatedModelConfig}  base model (+ erased UNet / export / tokens) or a folder of images
    attacks: {name: AttackConfig}           conf/attack/*.yaml, selected with `attack=[none,ring_a_bell]`
Budgets live in AttackConfig; generation settings (steps, CFG) in EvalGenerationConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from stereo.config import ConceptConfig, ModelConfig, check_choice

ATTACK_NAMES = ("none", "concept_inversion", "soft_prompt", "unlearndiffatk", "ring_a_bell", "token_file")
FID_EXTRACTORS = ("inception", "toy")


@dataclass
class EvaluatedModelConfig(ModelConfig):
    """One model under evaluation. Unset `kind` means "the base model" (`base`), then optionally:

    - `unet_weights`: a third-party erased UNet (.pt / .safetensors subset / diffusers folder);
    - `export`: one of our export folders (`unet/`, else `delta.safetensors`, else `lora/`);
    - `textual_inversion`: token files loaded into the text encoder (prompts may use the tokens);
    - `images`: a folder of images from any generator, scored as they are (no attacks run on it).
    """

    kind: Optional[str] = None  # unset fields (None) are taken from `base`
    resolution: Optional[int] = None
    dtype: Optional[str] = None
    device: Optional[str] = None
    seed: Optional[int] = None
    export: Optional[str] = None
    textual_inversion: list[str] = field(default_factory=list)
    images: Optional[str] = None


@dataclass
class AttackConfig:
    """One attack and its budget. Fields an attack does not use are ignored by it (and still reported)."""

    name: str = "none"
    seed: int = 0
    steps: int = 100  # optimisation steps (inversion, PGD, UnlearnDiffAtk) or generations (Ring-A-Bell)
    lr: float = 5e-3
    batch_size: int = 1  # latents per optimisation step
    # concept inversion / soft prompt: a learned token on images of the concept from the BASE model
    gallery_size: int = 8
    gallery_steps: int = 25
    num_vectors: int = 1
    pgd_eps: float = 0.1
    templates: list[str] = field(default_factory=list)  # empty: templates_for(concept.kind)
    token_file: Optional[str] = None  # token_file: a saved textual-inversion file to replay
    # UnlearnDiffAtk (Zhang et al. 2024): k prefix tokens, relaxed one-hot, projected every n steps
    prefix_tokens: int = 5
    project_every: int = 10
    prompt_batch: int = 8  # prompts optimised together (UnlearnDiffAtk, Ring-A-Bell)
    check_success: bool = True  # generate + detect after each projection, stop per prompt at first success
    # Ring-A-Bell (Tsai et al. 2024): concept vector * eta, genetic search over hard tokens
    eta: float = 3.0
    prompt_length: int = 16
    population: int = 32
    elite: int = 4
    mutation_rate: float = 0.1
    paired_prompts: list[list[str]] = field(default_factory=list)  # [[with concept, without], ...]


@dataclass
class EvalGenerationConfig:
    steps: int = 50
    guidance: float = 7.5  # CFG, unless the prompt set gives a per-prompt evaluation_guidance
    batch_size: int = 8
    seed: int = 0  # seed of prompt i is `seed + i` unless the prompt set gives an evaluation_seed
    max_prompts: Optional[int] = None  # evaluate only the first N prompts (smoke runs)
    grid_prompts: int = 8  # columns of the base-vs-erased PNG grids


@dataclass
class FIDConfig:
    extractor: Optional[str] = None  # None: no FID | inception | toy
    weights: Optional[str] = None  # pt_inception-2015-12-05-6726825d.pth (inception only)
    reference_dir: Optional[str] = None  # folder of real images (e.g. COCO val)
    cache_dir: Optional[str] = None  # reference statistics cache (default: <output_dir>/fid_cache)


@dataclass
class MetricsConfig:
    clip_path: Optional[str] = None  # local CLIPModel folder; None: no CLIP score
    fid: FIDConfig = field(default_factory=FIDConfig)
    utility_prompts: Optional[str] = None  # non-target prompts (set name or file): utility per model
    utility_detector: Any = None  # e.g. {name: toy, concept: square}; None: the concept detector


@dataclass
class EvaluateConfig:
    base: ModelConfig = field(default_factory=ModelConfig)  # the original model: galleries, grids' first row
    # label -> EvaluatedModelConfig fields. Untyped here so that `+models.esd.export=DIR` can add a model
    # from the command line (OmegaConf cannot add keys to a dict of dataclasses); `evaluated_models(cfg)`
    # checks every entry against EvaluatedModelConfig, so a typo still fails before anything runs.
    models: dict[str, Any] = field(default_factory=dict)
    concepts: dict[str, ConceptConfig] = field(default_factory=dict)  # exactly one
    attacks: dict[str, AttackConfig] = field(default_factory=dict)
    prompts: Optional[str] = None  # overrides the concept's eval_prompts
    detector: Any = None  # overrides the concept's detector, e.g. {name: nudenet, threshold: 0.6}
    generation: EvalGenerationConfig = field(default_factory=EvalGenerationConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    cpu: bool = False  # force CPU (also for multi-process gloo runs)
    # how long a collective waits for the other processes (NCCL's default is 10 minutes); the report,
    # written by the main process alone after every cell, is the longest such wait
    dist_timeout_minutes: int = 60
    progress: bool = True
    seed: int = 0
    output_dir: str = MISSING


def register_eval_configs() -> None:
    """Register the schema as `evaluate_schema` (first entry of conf/evaluate.yaml's defaults)."""
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


def validate_eval(cfg) -> None:
    """Rules the types cannot express; each error names the key, the bad value and the valid ones."""
    if len(cfg.concepts) != 1:
        raise ValueError(f"evaluation needs exactly one concept, got {sorted(cfg.concepts)}; pass concept=NAME")
    if not cfg.models:
        raise ValueError("no model to evaluate: add one, e.g. models.esd.export=outputs/run/export "
                         "(the default `models: {base: {}}` evaluates the base model)")
    if not cfg.attacks:
        raise ValueError("no attack selected: pass attack=[none,ring_a_bell] (see conf/attack/)")
    for key, attack in cfg.attacks.items():
        check_choice(attack.name, ATTACK_NAMES, f"attacks.{key}.name")
    if cfg.metrics.fid.extractor is not None:
        check_choice(cfg.metrics.fid.extractor, FID_EXTRACTORS, "metrics.fid.extractor")
        if not cfg.metrics.fid.reference_dir:
            raise ValueError("metrics.fid.extractor is set but metrics.fid.reference_dir is not; give a folder "
                             "of reference images (e.g. COCO val2014), or metrics.fid.extractor=null for no FID")
    for label, model in evaluated_models(cfg).items():
        sources = [k for k in ("unet_weights", "export", "images") if model.get(k)]
        if len(sources) > 1:
            raise ValueError(f"models.{label} sets {sources}; give at most one of unet_weights, export, images")
    if cfg.dist_timeout_minutes < 1:
        raise ValueError(f"dist_timeout_minutes={cfg.dist_timeout_minutes} must be >= 1 (minutes a process waits "
                         "for the others in a collective)")
    if cfg.generation.steps < 1 or cfg.generation.batch_size < 1:
        raise ValueError(f"generation.steps={cfg.generation.steps} and generation.batch_size="
                         f"{cfg.generation.batch_size} must be >= 1")


def evaluated_models(cfg) -> dict[str, Any]:
    """`cfg.models` with every entry checked against (and completed from) EvaluatedModelConfig."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, ValidationError

    models = {}
    for label, entry in cfg.models.items():
        try:
            models[label] = OmegaConf.merge(OmegaConf.structured(EvaluatedModelConfig), entry or {})
        except (ConfigKeyError, ValidationError) as error:
            valid = ", ".join(EvaluatedModelConfig.__dataclass_fields__)
            raise ValueError(f"models.{label} is not a valid model entry ({error.msg}); valid keys: {valid}") from None
    return models


def compose_eval(overrides: list[str] | None = None):
    """conf/evaluate.yaml composed like `python evaluate.py <overrides>` (tests, notebooks, benchmarks)."""
    from stereo.config import compose

    register_eval_configs()
    return compose(overrides, config_name="evaluate")
