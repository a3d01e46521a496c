"""Typed configuration schemas, registered in Hydra's ConfigStore.

Every YAML under `conf/` is validated against these dataclasses when it is composed, so a misspelled
key (`trainer.stpes=4`) or choice (`model.kind=sd16`) fails at compose time, naming the key and the
valid values. The defaults live here, once: a YAML under `conf/` sets only what its preset changes.
Rules about one dataclass's fields are checked in its `__post_init__`; `validate(cfg)` runs them all
(by instantiating the tree) and then the rules that span several dataclasses.

Over 300 lines on purpose: the whole schema — choices, then one dataclass per `conf/` group, each
field with its help — reads top to bottom in one file, as `conf/train.yaml` composes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class Choice(str, Enum):
    """A choice field's values. Members are strings that print as their value, so `kind == "sd14"`,
    `f"{kind}"`, dict lookups and `json.dumps` behave as with plain strings. Each member's name is its
    value (OmegaConf reads `kind: sd14` by member name and writes members back by name)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


# "sd14-random" is not an identifier, so ModelKind is built from the list of its names.
ModelKind = Choice("ModelKind", [(name, name) for name in (
    "sd14",          # Stable Diffusion 1.4 from `pretrained` (hub id, diffusers folder or single file)
    "sd15",          # Stable Diffusion 1.5 from `pretrained` (the same loading paths as sd14)
    "sd21",          # Stable Diffusion 2.1, 768 px, v-prediction, from `pretrained`
    "sd21-base",     # Stable Diffusion 2.1-base, 512 px, epsilon, from `pretrained`
    "sdxl",          # Stable Diffusion XL base 1.0, 1024 px, two text towers, from `pretrained`
    "sd14-random",   # the SD 1.4 architecture with random weights (benchmarks; no download)
    "sd21-random",   # the SD 2.1 (768 px, v-prediction) architecture with random weights (benchmarks)
    "sdxl-random",   # the SDXL base architecture with random weights (benchmarks; no download)
    "tiny",          # a random SD-shaped pipeline, ~1 M UNet parameters, 32 px (tests)
    "toy",           # the embedded toy world's trained pipeline (stereo/toy/weights)
    "pretrained",    # any diffusers SD or SDXL pipeline from `pretrained` (class from model_index.json)
)])


class Dtype(Choice):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class Device(Choice):
    auto = "auto"  # accelerate's choice: the process's GPU if any
    cpu = "cpu"


class ConceptKind(Choice):
    """Selects the textual-inversion templates and the evaluation detectors."""

    object = "object"
    style = "style"
    nudity = "nudity"


class Subset(Choice):
    """ESD's parameter subsets of the UNet (stereo.erasure.subsets)."""

    xattn = "xattn"        # cross-attention (attn2) layers only: ESD-x, for styles
    noxattn = "noxattn"    # every Linear/Conv2d but cross-attention: ESD-u, for objects and nudity
    selfattn = "selfattn"  # self-attention (attn1) layers only
    full = "full"          # every parameter of the UNet


class InversionMethod(Choice):
    ti = "ti"    # textual inversion: AdamW on the token's embedding
    pgd = "pgd"  # soft-prompt PGD: signed steps in an L-inf ball of radius pgd_eps


class Adversarial(Choice):
    """Which of STE's embeddings REO erases as negatives."""

    all = "all"
    last = "last"
    none = "none"


class KeepLatents(Choice):
    """Where the preservation term regresses the kept prompts (method.preserve.latents)."""

    concept = "concept"  # the erased concept's x_t: on the toy, the more specific of the two (docs/toy_tuning.md)
    own = "own"          # x_t from the student's own chain conditioned on the kept prompt: where it draws that concept


class MethodName(Choice):
    esd = "esd"        # Erased Stable Diffusion (Gandikota et al. 2023)
    reo = "reo"        # REO with the concept prompts only (no STE search): the ablation
    stereo = "stereo"  # STE (search) then REO (erase once)


class Stage(Choice):
    all = "all"  # STE then REO
    ste = "ste"  # the search only
    reo = "reo"  # REO on the embeddings of a finished STE run (method.ste_dir)


class MixedPrecision(Choice):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class LoggerName(Choice):
    none = "none"
    wandb = "wandb"


class WandbMode(Choice):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class ExportFormat(Choice):
    unet = "unet"          # diffusers UNet folder
    pipeline = "pipeline"  # full StableDiffusionPipeline folder
    delta = "delta"        # safetensors of the trained tensors only
    lora = "lora"          # adapter for pipe.load_lora_weights (needs method.lora.enabled)


def at_least(minimum: int, values: dict[str, int]) -> None:
    """A ValueError naming every `key=value` of `values` (keys: full config paths) below `minimum`."""
    bad = [f"{key}={value}" for key, value in values.items() if value < minimum]
    if bad:
        raise ValueError(f"{', '.join(bad)}: must be >= {minimum}")


@dataclass
class ModelConfig:
    """Which base model to load."""

    kind: ModelKind = ModelKind.tiny  # which loader (ModelKind above)
    pretrained: Optional[str] = None  # hub id, local diffusers folder, or single-file .ckpt/.safetensors
    revision: Optional[str] = None  # hub revision of `pretrained`
    single_file_config: Optional[str] = None  # local diffusers folder holding the component configs
    dtype: Dtype = Dtype.fp32  # dtype of the frozen parts (teacher, text encoder, VAE)
    device: Device = Device.auto  # cpu forces CPU even where a GPU is present
    resolution: int = 512  # image size in pixels used when sampling x_t
    unet_weights: Optional[str] = None  # a third-party erased UNet to load on top (.pt/.safetensors/folder)
    seed: int = 0  # random init of tiny / sd14-random


@dataclass
class ConceptConfig:
    """One concept to erase: its prompt text(s) and what later stages need to know about it."""

    name: str = MISSING  # the concept in words ("garbage truck")
    prompts: list[str] = field(default_factory=list)  # erase all of these (balanced)
    kind: ConceptKind = ConceptKind.object  # object | style | nudity
    subset: Subset = Subset.noxattn  # ESD's recommendation: xattn for styles, noxattn otherwise
    synonyms: list[str] = field(default_factory=list)  # other words for the concept (anchors, prompts)
    initializer_token: str = "object"  # textual-inversion init word ("person", "object", "art")
    inversion_templates: list[str] = field(default_factory=list)  # empty -> by kind
    anchors: Optional[str] = None  # built-in anchor set name or a file of anchor prompts
    gallery_prompts: list[str] = field(default_factory=list)  # prompts that depict the concept
    detector: dict[str, Any] = field(default_factory=dict)  # detector name + settings for evaluation
    eval_prompts: Optional[str] = None  # built-in prompt set name or file
    # concepts to keep, name -> prompts: shown beside the concept in sample grids (their first prompt), scored
    # by the concept's detector at the end of a run (`utility_seeds`), and preserved when method.preserve.weight > 0
    neighbours: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError(f"concept {self.name!r} has no prompts; set concepts.<key>.prompts")


@dataclass
class LoRAConfig:
    """A LoRA adapter on the erased subset instead of training its weights in place."""

    enabled: bool = False  # train (and export: export.formats=[unet,lora]) an adapter
    rank: int = 4  # rank of the adapter's low-rank update
    alpha: float = 4.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input


@dataclass
class InversionConfig:
    """The attack inside STE: concept inversion (textual inversion) or soft-prompt PGD."""

    method: InversionMethod = InversionMethod.ti  # ti | pgd
    steps: int = 3000  # optimisation steps per round
    lr: float = 5e-3  # AdamW (ti) or step size (pgd)
    batch_size: int = 1  # gallery images per step
    num_vectors: int = 1  # embedding vectors of the learned token
    pgd_eps: float = 0.1  # pgd: L-inf radius around the initial embedding
    templates: list[str] = field(default_factory=list)  # empty -> by concept kind (object/style/nudity)


@dataclass
class STEConfig:
    """Stage 1, Search Thoroughly Enough: K rounds of erase -> attack (STEREO.md)."""

    rounds: int = 4  # K (the reference uses 2 for nudity)
    erase_steps: int = 200  # ESD steps per round
    erase_lr: float = 5e-6  # AdamW learning rate of STE's erasures
    erase_eta: float = 1.0  # ESD eta of STE's erasures (stereo_reference: 0)
    erase_all_found: bool = True  # each round erases every embedding found so far (stereo_reference: latest only)
    gallery_size: int = 500  # images of the concept from the base model, for the inversions
    gallery_split: bool = True  # split the gallery across rounds (reference) or share it
    gallery_steps: int = 50  # DDIM steps per gallery image
    gallery_guidance: float = 7.5  # CFG per gallery image
    inversion: InversionConfig = field(default_factory=InversionConfig)  # the attack of each round
    # adversarial tokens learned per concept per round (the reference code's num_of_adv_concepts): token 0 starts
    # at the initializer's vectors, token j > 0 from a random start with its own seed
    tokens_per_round: int = 1
    # method.stage=ste only: export the last round's UNet as the run's export (STE alone as an erasure, without
    # REO: an ablation of what REO keeps of STE's robustness). Off: stage=ste searches and exports nothing
    export_last: bool = False

    def __post_init__(self) -> None:
        at_least(1, {"method.ste.rounds": self.rounds, "method.ste.tokens_per_round": self.tokens_per_round})


@dataclass
class REOConfig:
    """Stage 2, Robustly Erase Once: eps* = eps(∅) + eta_a (eps(a) - eps(∅)) - eta_n mean_n(eps(n) - eps(∅))."""

    steps: int = 200  # REO's optimisation steps
    # None: `steps` in all. N: N steps per negative (concept prompts + adversarial ones), so that each negative is
    # drawn as often as the concept alone is in REO-only, however many tokens STE found
    steps_per_negative: Optional[int] = None
    lr: float = 2e-5  # REO's AdamW learning rate
    eta_a: float = 1.0  # anchor guidance (reference: compositional scale s=2 -> s-1)
    eta_n: float = 3.0  # negative guidance (reference: s+1)
    anchors_per_step: int = 1  # anchors drawn per step
    num_anchors: Optional[int] = None  # None -> every anchor of the set
    adversarial: Adversarial = Adversarial.all  # which STE embeddings become negatives: all | last | none

    def __post_init__(self) -> None:
        at_least(1, {"method.reo.anchors_per_step": self.anchors_per_step})
        if self.steps_per_negative is not None:
            at_least(1, {"method.reo.steps_per_negative": self.steps_per_negative})


@dataclass
class PreserveConfig:
    """Opt-in preservation term (beyond the paper): each latent also draws one prompt of a concept to keep, and
    the student's prediction for it is regressed onto the teacher's, weight lambda (stereo.erasure.objectives)."""

    weight: float = 0.0  # lambda; 0 = off (ESD and STEREO as published)
    prompts: list[str] = field(default_factory=list)  # empty -> every neighbour prompt of the selected concepts
    latents: KeepLatents = KeepLatents.concept  # concept | own: the x_t the kept prompts are regressed at
    per_latent: int = 1  # kept prompts drawn for each latent of the erasure (balanced over the kept prompts)
    focus: float = 0.0  # beta >= 0: weigh each kept row by softmax(beta error / mean error); 0 = the plain mean

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"method.preserve.weight={self.weight} must be >= 0")
        if self.per_latent < 1:
            raise ValueError(f"method.preserve.per_latent={self.per_latent} must be >= 1")
        if not 0 <= self.focus <= 50:
            raise ValueError(f"method.preserve.focus={self.focus} must be in [0, 50] (0: plain mean)")


@dataclass
class MethodConfig:
    """The erasure method: `esd`, `reo` (concept only), or `stereo` (STE then REO)."""

    name: MethodName = MethodName.esd  # esd | reo | stereo
    eta: float = 1.0  # ESD guidance: eps* = eps(∅) - eta (eps(c) - eps(∅))
    subset: Optional[Subset] = None  # None -> the concepts' default subset
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # off: the subset's weights are trained in place
    ddim_steps: int = 50  # DDIM grid used to sample x_t
    xt_guidance: float = 3.0  # CFG scale of the student's DDIM chain that samples x_t
    stage: Stage = Stage.all  # stereo only: all | ste | reo
    ste_dir: Optional[str] = None  # stage=reo: a finished STE folder whose embeddings to use
    ste: STEConfig = field(default_factory=STEConfig)  # method.name=stereo
    reo: REOConfig = field(default_factory=REOConfig)  # method.name=reo | stereo
    preserve: PreserveConfig = field(default_factory=PreserveConfig)  # every erasure (ESD, STE rounds, REO)

    def __post_init__(self) -> None:
        if not 1 <= self.ddim_steps <= 1000:
            raise ValueError(f"method.ddim_steps={self.ddim_steps} must be in [1, 1000]")
        if self.stage != Stage.all and self.name != MethodName.stereo:
            raise ValueError(f"method.stage={self.stage} only applies to method.name=stereo")
        if self.stage == Stage.reo and not self.ste_dir:
            raise ValueError("method.stage=reo needs method.ste_dir=<a finished STE run folder>")


@dataclass
class TrainerConfig:
    """The optimisation loop shared by ESD, STE's erasures and REO."""

    steps: int = 200  # optimizer steps of ESD (STE and REO have their own)
    lr: float = 1e-5  # AdamW learning rate of ESD
    weight_decay: float = 0.0  # AdamW
    batch_size: int = 1  # x_t latents per step per process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: Optional[float] = None  # None -> no clipping
    mixed_precision: MixedPrecision = MixedPrecision.no  # accelerate's mixed precision: no | fp16 | bf16
    gradient_checkpointing: bool = False  # recompute the student's activations in backward (less memory)
    checkpoint_every: int = 0  # ESD/REO: save trained tensors + AdamW every N steps (0 = never); STE: per round
    checkpoints_total_limit: int = 2  # newest checkpoints kept (0 = keep all)
    resume: bool = False  # continue from the latest checkpoint in output_dir
    log_every: int = 1  # steps between logged losses
    sample_every: int = 0  # steps between preview grids (0 = only at the end, if the logger asks for samples)
    sample_steps: int = 25  # DDIM steps of the preview grids
    sample_guidance: float = 7.5  # CFG of the preview grids
    cpu: bool = False  # force CPU (also for multi-process gloo runs on CPU)
    dist_timeout_minutes: int = 60  # how long a collective waits for the other processes (NCCL's default: 10)

    def __post_init__(self) -> None:
        at_least(1, {"trainer.steps": self.steps, "trainer.batch_size": self.batch_size,
                     "trainer.grad_accum": self.grad_accum, "trainer.dist_timeout_minutes": self.dist_timeout_minutes})
        if self.checkpoints_total_limit < 0:
            raise ValueError(f"trainer.checkpoints_total_limit={self.checkpoints_total_limit} must be >= 0 "
                             "(0 = keep all)")


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.none  # none | wandb
    project: str = "stereo"  # wandb project
    mode: WandbMode = WandbMode.offline  # wandb mode: online | offline | disabled
    log_images: bool = True  # log the preview grids


@dataclass
class ExportConfig:
    # what the run writes at the end (ExportFormat above)
    formats: list[ExportFormat] = field(default_factory=lambda: [ExportFormat.unet, ExportFormat.delta])
    # Hub repo ("user/name") the export is uploaded to at the end of the run, with its model card (stereo.publish);
    # the token comes from HF_TOKEN or `hf auth login`
    push_to_hub: Optional[str] = None
    hub_private: bool = False  # create the repo private (an existing repo keeps its visibility)
    hub_revision: Optional[str] = None  # upload to this branch (created from main if missing), not main

    def __post_init__(self) -> None:
        if self.push_to_hub:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.push_to_hub)
            except HFValidationError as err:
                raise ValueError(f"export.push_to_hub={self.push_to_hub!r} is no Hub repo id ('user/name'): "
                                 f"{err}") from None


@dataclass
class StereoConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    concepts: dict[str, ConceptConfig] = field(default_factory=dict)  # key -> concept (conf/concept/<key>.yaml)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    seed: int = 0  # seeds the whole run (x_t noise, anchors, attacks)
    utility_seeds: int = 4  # images per neighbour prompt in the end-of-run utility check (0 = off)
    output_dir: str = "outputs"  # everything a run writes
    extras: dict[str, Any] = field(default_factory=dict)  # free-form notes for experiments


def register_configs() -> None:
    """Register the schema as `stereo_schema`; `conf/train.yaml` lists it first in its defaults."""
    ConfigStore.instance().store(name="stereo_schema", node=StereoConfig)


def check_choice(value: Any, valid: tuple[str, ...], key: str) -> None:
    """A ValueError naming the key, the bad value and the valid ones, unless `value` is one of `valid`."""
    if value not in valid:
        raise ValueError(f"{key}={value!r} is not valid; choose one of {', '.join(valid)}")


def validate(cfg: DictConfig | StereoConfig) -> None:
    """Every rule the types cannot express; raises ValueError naming the bad values.

    Instantiating the tree runs each dataclass's own checks (`__post_init__`); the rules below span
    several dataclasses.
    """
    if isinstance(cfg, DictConfig):
        OmegaConf.to_object(cfg)
    if not cfg.concepts:
        raise ValueError("no concept selected: pass concept=NAME (or concept=[a,b]); see conf/concept/")
    if cfg.method.subset is None and len({c.subset for c in cfg.concepts.values()}) > 1:
        subsets = sorted(str(c.subset) for c in cfg.concepts.values())
        raise ValueError(f"the selected concepts default to different parameter subsets {subsets}; "
                         "set method.subset explicitly")
    if "lora" in cfg.export.formats and not cfg.method.lora.enabled:
        raise ValueError("export.formats includes 'lora' but method.lora.enabled=false")
    if cfg.method.lora.enabled and "delta" in cfg.export.formats:
        raise ValueError("with method.lora.enabled=true export 'lora' (the adapter), not 'delta'")
    if cfg.method.preserve.weight > 0 and not cfg.method.preserve.prompts and not kept_concepts(cfg):
        raise ValueError("method.preserve.weight > 0 but nothing to preserve: set method.preserve.prompts=[...] "
                         "or the concept's neighbours (concepts.<key>.neighbours)")


def kept_concepts(cfg: DictConfig | StereoConfig) -> dict[str, list[str]]:
    """The neighbours of every selected concept, name -> prompts (de-duplicated, in order), without the
    selected concepts themselves: what a run must keep (grids, utility check, preservation term)."""
    kept: dict[str, list[str]] = {}
    for concept in cfg.concepts.values():
        for name, prompts in concept.neighbours.items():
            if name not in cfg.concepts:
                kept.setdefault(name, [])
                kept[name] += [p for p in prompts if p not in kept[name]]
    return kept


def erased_subset(cfg: DictConfig | StereoConfig) -> str:
    """The parameter subset this run trains (method.subset, else the concepts' shared default)."""
    if cfg.method.subset is not None:
        return str(cfg.method.subset)
    return str(next(iter(cfg.concepts.values())).subset)


def to_container(cfg: DictConfig) -> dict:
    """`cfg` resolved to plain Python (choices as strings): for run.json, trackers and manifests."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """The real config tree composed like `python train.py <overrides>` (for tests, benchmarks, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return hydra_compose(config_name=config_name, overrides=list(overrides or []))
        except ConfigCompositionException as error:  # "Error merging override k=v": add why, as the CLI prints it
            cause = error.__cause__
            if isinstance(cause, OmegaConfBaseException) and str(cause) not in str(error):
                raise ConfigCompositionException(f"{error}\n{cause}") from cause
            raise
