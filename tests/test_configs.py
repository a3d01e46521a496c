"""Every config composes against the typed schema; typos and bad values fail early and clearly."""

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigKeyError, ValidationError

from stereo.config import CONF_DIR as CONF
from stereo.config import validate
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


@pytest.mark.parametrize("override,message", [
    ("method.subset=attn", "choose one of xattn, noxattn, selfattn, full"),
    ("trainer.mixed_precision=fp8", "trainer.mixed_precision"),
    ("logger.mode=sometimes", "logger.mode"),
    ("export.formats=[unet,onnx]", "export.formats"),
    ("export.formats=[lora]", "method.lora.enabled=false"),
    ("trainer.steps=0", "trainer.steps=0"),
])
def test_validate_names_the_bad_value(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        validate(compose([override]))


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
