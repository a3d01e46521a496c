"""Every config composes against the typed schema; typos and bad values fail early and clearly."""

import json
import re

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from stereo.config import CONF_DIR as CONF
from stereo.config import (
    ExportConfig,
    LoggerConfig,
    MethodConfig,
    ModelConfig,
    ModelKind,
    Subset,
    TrainerConfig,
    erased_subset,
    to_container,
    validate,
)
from tests.conftest import compose

GROUPS = ["model", "method", "concept", "trainer", "logger", "export", "experiment", "debug"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes_and_validates(group):
    for name in options(group):
        cfg = compose([f"{group}={name}"])
        if group not in ("method", "export") or name not in ("esd_lora", "lora"):
            validate(cfg)
        else:  # the LoRA method and the LoRA export are meant to be used together
            validate(compose(["method=esd_lora", "export=lora"]))


def test_several_concepts_in_one_run():
    cfg = compose(["concept=[church,parachute]"])
    assert list(cfg.concepts) == ["church", "parachute"]
    assert cfg.concepts.parachute.prompts == ["parachute"]


def test_typo_in_a_key_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="stpes"):
        compose(["trainer.stpes=4"])


def test_wrong_type_fails_at_compose_time():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose(["trainer.steps=many"])


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(MissingConfigException, match="church"):
        compose(["concept=churhc"])
    with pytest.raises(MissingConfigException, match="tiny"):
        compose(["model=sd15x"])


@pytest.mark.parametrize("override,key,valid", [
    ("model.kind=sd16", "model.kind",
     "sd14, sd15, sd21, sd21-base, sdxl, sd14-random, sd21-random, sdxl-random, tiny, toy, pretrained"),
    ("method.subset=attn", "method.subset", "xattn, noxattn, selfattn, full"),
    ("method.name=stereoo", "method.name", "esd, reo, stereo"),
    ("method.stage=both", "method.stage", "all, ste, reo"),
    ("method.reo.adversarial=first", "method.reo.adversarial", "all, last, none"),
    ("method.ste.inversion.method=adam", "method.ste.inversion.method", "ti, pgd"),
    ("trainer.mixed_precision=fp8", "trainer.mixed_precision", "no, fp16, bf16"),
    ("model.dtype=fp64", "model.dtype", "fp32, fp16, bf16"),
    ("model.device=gpu", "model.device", "auto, cpu"),
    ("logger.name=tensorboard", "logger.name", "none, wandb"),
    ("logger.mode=sometimes", "logger.mode", "online, offline, disabled"),
    ("export.formats=[unet,onnx]", "export.formats[1]", "unet, pipeline, delta, lora"),
    ("concepts.circle.kind=shape", "concepts.circle.kind", "object, style, nudity"),
    ("concepts.circle.subset=attn", "concepts.circle.subset", "xattn, noxattn, selfattn, full"),
])
def test_a_misspelled_choice_fails_at_compose_time_naming_the_key_and_the_valid_values(override, key, valid):
    with pytest.raises(ConfigCompositionException) as error:
        compose([override])
    assert f"full_key: {key}\n" in str(error.value) and f"expected one of [{valid}]" in str(error.value)


@pytest.mark.parametrize("overrides,message", [
    (["trainer.steps=0"], "trainer.steps=0: must be >= 1"),
    (["trainer.batch_size=0", "trainer.grad_accum=0"], "trainer.batch_size=0, trainer.grad_accum=0: must be >= 1"),
    (["trainer.checkpoints_total_limit=-1"], "trainer.checkpoints_total_limit=-1 must be >= 0"),
    (["trainer.dist_timeout_minutes=0"], "trainer.dist_timeout_minutes=0: must be >= 1"),
    (["method.ddim_steps=1001"], "method.ddim_steps=1001 must be in [1, 1000]"),
    (["method=esd", "method.stage=ste"], "method.stage=ste only applies to method.name=stereo"),
    (["method.stage=reo"], "method.stage=reo needs method.ste_dir"),
    (["method.ste.rounds=0"], "method.ste.rounds=0: must be >= 1"),
    (["method.reo.anchors_per_step=0"], "method.reo.anchors_per_step=0: must be >= 1"),
    (["method.preserve.focus=-1"], "method.preserve.focus=-1.0 must be in [0, 50]"),
    (["concepts.circle.prompts=[]"], "concept 'circle' has no prompts"),
])
def test_validate_runs_each_dataclass_own_checks(overrides, message):
    cfg = compose(overrides)  # composing does not run __post_init__; validate does
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(cfg)


def test_a_dataclass_built_in_code_checks_its_fields_too():
    with pytest.raises(ValueError, match="trainer.steps=0"):
        TrainerConfig(steps=0)
    with pytest.raises(ValueError, match="method.stage=reo needs method.ste_dir"):
        MethodConfig(name="stereo", stage="reo")
    MethodConfig(name="stereo", stage="reo", ste_dir="outputs/ste")


@pytest.mark.parametrize("overrides,message", [
    (["export.formats=[lora]"], "export.formats includes 'lora' but method.lora.enabled=false"),
    (["method=esd_lora"], "with method.lora.enabled=true export 'lora' (the adapter), not 'delta'"),
])
def test_validate_checks_the_rules_across_dataclasses(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(compose(overrides))


def test_choices_read_and_write_as_plain_strings():
    cfg = compose(["model=sd14-random", "method=stereo", "concept=vangogh"])
    assert cfg.model.kind == "sd14-random" and cfg.model.kind is ModelKind["sd14-random"]
    assert f"{cfg.model.kind}/{cfg.method.name}" == "sd14-random/stereo" and "delta" in cfg.export.formats
    assert erased_subset(cfg) == "xattn" and type(erased_subset(cfg)) is str
    assert {"xattn": 1}[cfg.concepts.vangogh.subset] == 1 and Subset.xattn == "xattn"
    plain = to_container(cfg)
    assert type(plain["model"]["kind"]) is str and plain["export"]["formats"] == ["unet", "delta"]
    assert json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True)))["method"]["name"] == "stereo"
    assert "kind: sd14-random\n" in OmegaConf.to_yaml(cfg, resolve=True)
    assert compose(["method.subset=null"]).method.subset is None


def test_xt_guidance_and_the_preview_guidance_are_distinct_settings():
    cfg = compose(["method.xt_guidance=2.5", "trainer.sample_guidance=6.0"])
    assert (cfg.method.xt_guidance, cfg.trainer.sample_guidance) == (2.5, 6.0)
    with pytest.raises(ConfigCompositionException, match="sample_guidance"):
        compose(["method.sample_guidance=2.5"])


SCHEMAS = {"model": ModelConfig, "method": MethodConfig, "trainer": TrainerConfig, "logger": LoggerConfig,
           "export": ExportConfig}
IDENTITY = {"model": {"kind"}, "method": {"name"}, "logger": {"name"}}  # the option's name, written out


def option_layers(group, name):
    """(what `group=name` starts from: the schema merged with its `defaults` parents, its own settings)."""
    own = OmegaConf.load(CONF / group / f"{name}.yaml")
    base = OmegaConf.structured(SCHEMAS[group])
    for parent in own.pop("defaults", []):
        base = OmegaConf.merge(base, *option_layers(group, parent))
    return base, own


def leaves(node, prefix=""):
    for key, value in node.items():
        path = f"{prefix}{key}"
        yield from leaves(value, f"{path}.") if OmegaConf.is_dict(value) else [path]


@pytest.mark.parametrize("group", sorted(SCHEMAS))
def test_an_option_sets_only_what_differs_from_the_schema_default(group):
    def plain(node, path):
        value = OmegaConf.select(node, path)
        return OmegaConf.to_container(value, enum_to_str=True) if OmegaConf.is_config(value) else str(value)

    for name in options(group):
        base, own = option_layers(group, name)
        merged = OmegaConf.merge(base, own)
        restated = [path for path in leaves(own) if path not in IDENTITY.get(group, ())
                    and plain(base, path) == plain(merged, path)]
        assert not restated, f"conf/{group}/{name}.yaml restates the default of {restated} (stereo/config.py)"


def test_concepts_with_different_default_subsets_need_an_explicit_subset():
    with pytest.raises(ValueError, match="set method.subset explicitly"):
        validate(compose(["model=sd14", "concept=[church,vangogh]"]))
    validate(compose(["model=sd14", "concept=[church,vangogh]", "method.subset=xattn"]))


def test_no_concept_is_an_error():
    cfg = compose([])
    cfg.concepts = {}
    with pytest.raises(ValueError, match="no concept selected"):
        validate(cfg)


def test_unknown_concept_key_in_a_concept_file_is_rejected():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose(["concepts.church.colour=red"])


def test_sd14_frozen_parts_default_to_bf16_and_trainer_settings_exist():
    cfg = compose(["model=sd14", "trainer=gpu"])
    assert cfg.model.dtype == "bf16"  # fp32's exponent range: attack gradients through the frozen UNet don't underflow
    assert cfg.trainer.checkpoints_total_limit == 2 and cfg.trainer.dist_timeout_minutes == 60
    assert compose(["model=sd14", "model.dtype=fp16"]).model.dtype == "fp16"
    with pytest.raises(ValueError, match="dist_timeout_minutes=0"):
        validate(compose(["trainer.dist_timeout_minutes=0"]))


def test_the_esd_experiment_runs_esd():
    cfg = compose(["experiment=sd14_nudity_esd"])  # the app's default method is stereo
    assert (cfg.method.name, cfg.model.kind, list(cfg.concepts), cfg.trainer.steps) == ("esd", "sd14", ["nudity"], 200)


def test_the_toy_stereo_default_is_the_held_out_variant_and_only_for_that_pair():
    """`python train.py` (toy, STEREO) trains the variant the README's held-out table reports as
    `stereo-noxattn+preserve3x4-slow-focus2`; `~tuned`, other methods and other models keep the published settings."""
    from benchmarks.toy_robustness import parse_method

    variant = parse_method(
        "stereo-noxattn+preserve3x4-slow-focus2:method=stereo,method.subset=noxattn,method.preserve.weight=3.0,"
        "method.preserve.latents=concept,method.preserve.per_latent=4,method.ste.erase_lr=3e-4,method.reo.lr=3e-4,"
        "method.ste.erase_steps=200,method.reo.steps=400,method.preserve.focus=2.0")
    default = compose([])
    assert OmegaConf.to_container(default.method) == OmegaConf.to_container(compose(list(variant.overrides)).method)
    assert default.method.subset == "noxattn" and default.method.preserve.weight == 3.0
    published = compose(["~tuned"])
    assert published.method.subset == "xattn" and published.method.preserve.weight == 0
    assert published.method.preserve.focus == 0
    assert published.method.reo.steps == 200 and published.method.reo.lr == 1e-3
    for others in (["method=esd"], ["method=reo"], ["model=sd14", "method=stereo"]):
        assert compose(others).method.preserve.weight == 0, others
