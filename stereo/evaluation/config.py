"""Typed schemas of `evaluate.py` (conf/evaluate.yaml), registered in Hydra's ConfigStore.

An evaluation crosses several evaluated models with several attacks on one concept:
    models:  {label: EvaluatedModelConfig}  base model (+ erased UNet / export / tokens) or a folder of images
    attacks: {name: <attack>Config}         conf/attack/<name>.yaml, selected with `attack=[none,ring_a_bell]`
Each attack has its own schema (its budget, with the defaults, here once); its YAML names it in its
defaults list, so a key the attack does not have fails at compose time. Generation settings (steps,
CFG) are in EvalGenerationConfig. Rules about one dataclass's fields are in its `__post_init__`;
`validate_eval(cfg)` runs them all (by instantiating the tree), then checks the evaluated models.

Over 300 lines on purpose: every schema of `evaluate.py`, each field with its help, in one file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from stereo.config import Choice, ConceptConfig, Device, Dtype, ModelConfig, ModelKind, check_choice, compose
from stereo.models.released import COMPONENTS, released_model


@dataclass
class EvaluatedModelConfig(ModelConfig):
    """One model under evaluation. Unset `kind` means "the base model" (`base`), then optionally:

    - `unet_weights`: a third-party erased UNet (.pt / .safetensors subset / diffusers folder);
    - `export`: one of our export folders (`unet/`, else `delta.safetensors`, else `lora/`);
    - `textual_inversion`: token files loaded into the text encoder (prompts may use the tokens);
    - `images`: a folder of images from any generator, scored as they are (no attacks run on it);
    - `hub` (+ `subfolder` / `filename`, `hub_revision`, `sha256`, `component`): a released erased checkpoint
      on the Hugging Face Hub (or a local copy), replacing `component` (stereo.models.hub, .components);
    - `released`: a registry name (stereo/models/released.yaml) that fills the hub fields left unset;
    - `text_encoder_weights`: a third-party erased text encoder (CLIPTextModel folder / .safetensors / .pt).
    """

    kind: Optional[ModelKind] = None  # unset fields (None) are taken from `base`
    resolution: Optional[int] = None
    dtype: Optional[Dtype] = None
    device: Optional[Device] = None
    seed: Optional[int] = None
    export: Optional[str] = None  # one of our export folders (read by stereo.load_export)
    textual_inversion: list[str] = field(default_factory=list)  # token files loaded into the text encoder
    images: Optional[str] = None  # a folder of images, scored as they are
    released: Optional[str] = None  # a released erased model by name (stereo/models/released.yaml)
    hub: Optional[str] = None  # hub repo "org/name" of an erased checkpoint, or a local file / folder
    subfolder: Optional[str] = None  # folder in `hub` (alone: load that whole folder, e.g. a CLIPTextModel)
    filename: Optional[str] = None  # file in `hub` (under `subfolder`)
    hub_revision: Optional[str] = None  # branch / tag / commit of `hub`; unset: main (the commit is recorded)
    sha256: Optional[str] = None  # expected sha256 of what `hub` resolves to (mismatch: error)
    component: Optional[str] = None  # what `hub` replaces: unet (default) | text_encoder | lora | textual_inversion
    text_encoder_weights: Optional[str] = None  # an erased text encoder: CLIPTextModel folder / .safetensors / .pt

    def __post_init__(self) -> None:
        third_party = self.hub or self.released
        sources = [k for k in ("unet_weights", "export", "images") if getattr(self, k)]
        sources += ["hub"] if third_party else []
        if len(sources) > 1:
            raise ValueError(f"sets {sources}; give at most one of unet_weights, export, images, hub/released")
        if self.images and self.text_encoder_weights:
            raise ValueError("sets images and text_encoder_weights; an image folder loads no model")
        hub_fields = [k for k in ("subfolder", "filename", "hub_revision", "sha256", "component") if getattr(self, k)]
        if hub_fields and not third_party:
            raise ValueError(f"sets {hub_fields} without hub or released; they describe the `hub` checkpoint")
        if self.component is not None:
            check_choice(self.component, COMPONENTS, "component")
        if self.released is not None:
            released_model(self.released)  # an unknown name lists the known ones


class AttackName(Choice):
    """The attacks (`conf/attack/<name>.yaml`, each with its schema below)."""

    none = "none"  # the plain prompts (pre-attack ASR)
    concept_inversion = "concept_inversion"  # textual inversion against the evaluated model (Pham et al. 2023)
    soft_prompt = "soft_prompt"  # PGD on a token's vectors in an L∞ ball (AdvUnlearn style)
    unlearndiffatk = "unlearndiffatk"  # prefix tokens, relaxed one-hot (Zhang et al. 2024)
    ring_a_bell = "ring_a_bell"  # black-box genetic search over hard tokens (Tsai et al. 2024)
    token_file = "token_file"  # a saved textual-inversion file, replayed


@dataclass
class AttackConfig:
    """What every attack has. Each attack's schema adds its budget; `conf/attack/<name>.yaml` selects it."""

    name: AttackName = AttackName.none  # fixed by the schema (checked)
    seed: int = 0  # the attack's random seed (gallery images, inversion batches, search)

    def __post_init__(self) -> None:
        schema = ATTACK_SCHEMAS[AttackName(self.name)]
        if type(self) not in (AttackConfig, schema):
            raise ValueError(f"attack name {str(self.name)!r} does not fit the {type(self).__name__} schema "
                             f"(that attack's schema is {schema.__name__}); select attacks with attack=[...]")


@dataclass
class NoAttackConfig(AttackConfig):
    """The plain prompts."""

    name: AttackName = AttackName.none


@dataclass
class GalleryConfig(AttackConfig):
    """Attacks that learn from the BASE model's images of the concept (its "gallery")."""

    gallery_size: int = 32  # images of the concept generated by the base model
    gallery_steps: int = 50  # DDIM steps of each gallery image
    # independent runs of the attack, one evaluation cell each (restart r >= 1: its own seed and random start;
    # the gallery is shared); the report gives each restart's ASR, their mean and the worst restart
    restarts: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gallery_size < 1 or self.gallery_steps < 1:
            raise ValueError(f"gallery_size={self.gallery_size} and gallery_steps={self.gallery_steps} must be >= 1")
        if self.restarts < 1:
            raise ValueError(f"restarts={self.restarts} must be >= 1 (independent runs of the attack)")


@dataclass
class ConceptInversionConfig(GalleryConfig):
    """Concept inversion (Pham et al. 2023): textual inversion against the evaluated model on the base model's
    images of the concept. Reference budget: 3000 steps, lr 5e-3, batch 1."""

    name: AttackName = AttackName.concept_inversion
    steps: int = 1000  # optimisation steps
    lr: float = 5e-3  # AdamW learning rate
    batch_size: int = 1  # latents per optimisation step
    num_vectors: int = 1  # vectors of the learned token
    pgd_eps: float = 0.1  # (soft_prompt's L∞ radius; recorded, unused by textual inversion)
    templates: list[str] = field(default_factory=list)  # prompt templates; empty: templates_for(concept.kind)


@dataclass
class SoftPromptConfig(ConceptInversionConfig):
    """Soft-prompt PGD (AdvUnlearn style): signed-gradient steps on the token vectors in an L∞ ball."""

    name: AttackName = AttackName.soft_prompt
    steps: int = 200  # PGD steps
    lr: float = 1e-3  # PGD step size
    pgd_eps: float = 0.1  # L∞ radius around the initial vectors


@dataclass
class TokenFileConfig(AttackConfig):
    """Replays a saved textual-inversion file (e.g. an adversarial embedding found by STE)."""

    name: AttackName = AttackName.token_file
    token_file: Optional[str] = None  # the .safetensors file (required)
    templates: list[str] = field(default_factory=list)  # prompt templates; empty: templates_for(concept.kind)


@dataclass
class UnlearnDiffAtkConfig(GalleryConfig):
    """UnlearnDiffAtk (Zhang et al. 2024): prefix tokens as relaxed one-hot vectors, Adam on the evaluated
    model's denoising loss, projection to real tokens every `project_every` steps, stop at first success."""

    name: AttackName = AttackName.unlearndiffatk
    steps: int = 400  # optimisation steps per prompt batch
    lr: float = 1e-2  # Adam learning rate
    prefix_tokens: int = 5  # k prefix tokens
    project_every: int = 40  # steps between projections to real tokens
    check_success: bool = True  # generate + detect after each projection, stop per prompt at first success
    prompt_batch: int = 8  # prompts optimised together

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.project_every < 1 or self.prefix_tokens < 1:
            raise ValueError(f"project_every={self.project_every} and prefix_tokens={self.prefix_tokens} must be >= 1")


@dataclass
class RingABellConfig(AttackConfig):
    """Ring-A-Bell (Tsai et al. 2024), black-box: a concept vector from paired prompts, then a genetic
    search over hard tokens for prompt + eta * vector; eta 3 for nudity."""

    name: AttackName = AttackName.ring_a_bell
    steps: int = 200  # generations of the genetic search
    eta: float = 3.0  # weight of the concept vector
    prompt_length: int = 16  # hard tokens per attacked prompt
    population: int = 64  # individuals per generation
    elite: int = 8  # best individuals kept unchanged
    mutation_rate: float = 0.1  # probability of replacing each token of a child
    prompt_batch: int = 8  # prompts searched together
    paired_prompts: list[list[str]] = field(default_factory=list)  # [[with concept, without], ...];
    # empty: the concept's inversion templates with / without the concept

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.elite <= self.population:
            raise ValueError(f"elite={self.elite} must be in [0, population={self.population}]")


ATTACK_SCHEMAS: dict[AttackName, type[AttackConfig]] = {
    AttackName.none: NoAttackConfig, AttackName.concept_inversion: ConceptInversionConfig,
    AttackName.soft_prompt: SoftPromptConfig, AttackName.unlearndiffatk: UnlearnDiffAtkConfig,
    AttackName.ring_a_bell: RingABellConfig, AttackName.token_file: TokenFileConfig,
}


def attack_config(name: str, **budget: Any) -> AttackConfig:
    """The schema of attack `name` with `budget` set (unknown names and fields raise)."""
    check_choice(name, tuple(a.value for a in AttackName), "attack")
    return ATTACK_SCHEMAS[AttackName(name)](**budget)


def attack_budget(settings) -> dict[str, Any]:
    """An attack's settings as a plain dict (what the manifest records)."""
    if OmegaConf.is_config(settings):
        return OmegaConf.to_container(settings, resolve=True)
    return asdict(settings) if is_dataclass(settings) else dict(settings)


def attack_restarts(settings) -> int:
    """How many independent restarts of the attack run (1 for attacks without `restarts`)."""
    return int(attack_budget(settings).get("restarts", 1))


def cell_budget(settings, restart: int = 0) -> dict[str, Any]:
    """What one cell of the attack records and checks on resume: its budget without the number of
    restarts (that is how many cells run, not what one cell asks) and, for restart r >= 1, `restart: r`.
    Restart 0 therefore records exactly what a cell recorded before restarts existed."""
    budget = {k: v for k, v in attack_budget(settings).items() if k != "restarts"}
    return {**budget, "restart": restart} if restart else budget


@dataclass
class EvalGenerationConfig:
    steps: int = 50  # DDIM steps of every evaluated image
    guidance: float = 7.5  # CFG, unless the prompt set gives a per-prompt evaluation_guidance
    batch_size: int = 8  # images generated (and detected) together
    seed: int = 0  # seed of prompt i is `seed + i` unless the prompt set gives an evaluation_seed
    max_prompts: Optional[int] = None  # evaluate only the first N prompts (smoke runs)
    grid_prompts: int = 8  # columns of the base-vs-erased PNG grids

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"generation.steps={self.steps} and generation.batch_size={self.batch_size} "
                             "must be >= 1")


@dataclass
class FIDConfig:
    # None: no FID | inception (built in) | another registered extractor, e.g. toy (stereo.toy.features)
    extractor: Optional[str] = None
    weights: Optional[str] = None  # pt_inception-2015-12-05-6726825d.pth (inception only)
    reference_dir: Optional[str] = None  # folder of real images (e.g. COCO val)
    cache_dir: Optional[str] = None  # reference statistics cache (default: <output_dir>/fid_cache)

    def __post_init__(self) -> None:
        if self.extractor is not None and not self.reference_dir:
            raise ValueError("metrics.fid.extractor is set but metrics.fid.reference_dir is not; give a folder "
                             "of reference images (e.g. COCO val2014), or metrics.fid.extractor=null for no FID")


@dataclass
class MetricsConfig:
    clip_path: Optional[str] = None  # local CLIPModel folder; None: no CLIP score
    fid: FIDConfig = field(default_factory=FIDConfig)
    utility_prompts: Optional[str] = None  # non-target prompts (set name or file): utility per model
    utility_detector: Any = None  # e.g. {name: toy, concept: square}; None: the concept detector
    # more non-target concepts, one utility cell each: {name: {prompts: <set or file>, detector: {...}}}, e.g.
    # every other shape of the toy world (`+metrics.utility_sets.square={prompts: square, detector: {name: toy,
    # concept: square}}`); a row `utility-<name>` per model
    utility_sets: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluateConfig:
    base: ModelConfig = field(default_factory=ModelConfig)  # the original model: galleries, grids' first row
    # label -> EvaluatedModelConfig fields. Untyped here so that `+models.esd.export=DIR` can add a model
    # from the command line (OmegaConf cannot add keys to a dict of dataclasses); `evaluated_models(cfg)`
    # checks every entry against EvaluatedModelConfig, so a typo still fails before anything runs.
    models: dict[str, Any] = field(default_factory=dict)
    concepts: dict[str, ConceptConfig] = field(default_factory=dict)  # exactly one
    attacks: dict[str, AttackConfig] = field(default_factory=dict)  # key -> its attack's schema
    # overrides the concept's eval_prompts: a built-in set, a file, or a standard set (i2p, i2p_nudity,
    # unlearndiffatk_nudity, coco10k, ...: stereo/evaluation/prompt_sets/manifests/, fetched once and verified)
    prompts: Optional[str] = None
    # local files of standard sets, read instead of a download: {i2p: {path: /data/i2p.csv}} (checked the same)
    prompt_sets: dict[str, Any] = field(default_factory=dict)
    # overrides the concept's detector, e.g. {name: nudenet, preset: unlearndiffatk} or {name: nudenet, threshold:
    # 0.6, thresholds: [0.45, 0.5]}; without a name it changes the concept's (+detector.thresholds=[0.45,0.6]).
    # NudeNet presets (unlearndiffatk, rece, safree): stereo.evaluation.nudenet.NUDENET_PRESETS
    detector: Any = None
    generation: EvalGenerationConfig = field(default_factory=EvalGenerationConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    cpu: bool = False  # force CPU (also for multi-process gloo runs)
    # how long a collective waits for the other processes (NCCL's default is 10 minutes); the report,
    # written by the main process alone after every cell, is the longest such wait
    dist_timeout_minutes: int = 60
    progress: bool = True  # progress bars (main process)
    seed: int = 0  # recorded in the manifest (prompt seeds: generation.seed)
    output_dir: str = MISSING

    def __post_init__(self) -> None:
        if len(self.concepts) != 1:
            raise ValueError(f"evaluation needs exactly one concept, got {sorted(self.concepts)}; pass concept=NAME")
        if not self.models:
            raise ValueError("no model to evaluate: add one, e.g. models.esd.export=outputs/run/export "
                             "(the default `models: {base: {}}` evaluates the base model)")
        if not self.attacks:
            raise ValueError("no attack selected: pass attack=[none,ring_a_bell] (see conf/attack/)")
        if self.prompt_sets:
            from stereo.evaluation.prompt_sets.standard import local_paths

            local_paths(self.prompt_sets)  # every name a standard set, every entry {path: file}
        if self.dist_timeout_minutes < 1:
            raise ValueError(f"dist_timeout_minutes={self.dist_timeout_minutes} must be >= 1 (minutes a process "
                             "waits for the others in a collective)")


def register_eval_configs() -> None:
    """Register the schema as `evaluate_schema` (first entry of conf/evaluate.yaml's defaults) and each
    attack's schema as `attack_schema/<name>` (first entry of conf/attack/<name>.yaml's defaults)."""
    store = ConfigStore.instance()
    store.store(name="evaluate_schema", node=EvaluateConfig)
    for name, schema in ATTACK_SCHEMAS.items():
        store.store(group="attack_schema", name=name.value, node=schema)


def validate_eval(cfg) -> None:
    """Every rule the types cannot express; each error names the key, the bad value and the valid ones.

    Instantiating the tree runs each dataclass's own checks (`__post_init__`); an attack's error is
    prefixed with its key first, an evaluated model is checked by `evaluated_models`.
    """
    for key, attack in cfg.attacks.items():
        try:
            OmegaConf.to_object(attack)
        except ValueError as error:
            raise ValueError(f"attacks.{key}: {error}") from None
    OmegaConf.to_object(cfg)
    evaluated_models(cfg)


def evaluated_models(cfg) -> dict[str, Any]:
    """`cfg.models` with every entry checked against (and completed from) EvaluatedModelConfig."""
    from omegaconf.errors import ConfigKeyError, ValidationError

    models = {}
    for label, entry in cfg.models.items():
        try:
            models[label] = OmegaConf.merge(OmegaConf.structured(EvaluatedModelConfig), entry or {})
            OmegaConf.to_object(models[label])  # its __post_init__
        except (ConfigKeyError, ValidationError) as error:
            valid = ", ".join(EvaluatedModelConfig.__dataclass_fields__)
            raise ValueError(f"models.{label} is not a valid model entry ({error.msg}); valid keys: {valid}") from None
        except ValueError as error:
            raise ValueError(f"models.{label} {error}") from None
    return models


def compose_eval(overrides: list[str] | None = None):
    """conf/evaluate.yaml composed like `python evaluate.py <overrides>` (tests, notebooks, benchmarks)."""
    register_eval_configs()
    return compose(overrides, config_name="evaluate")
