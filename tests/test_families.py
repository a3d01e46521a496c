"""SD 1.5, SD 2.1 (v-prediction), SD 2.1-base and SDXL: each family's tiny rehearsal folder loads through
`model=<family> model.pretrained=DIR` as its own pipeline class, keeps its scheduler, and generates."""

import json
import time

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from stereo.models import families
from stereo.models.families import FAMILIES, SD21_SCHEDULER_CONFIG, family_pipeline, save_family_rehearsal
from stereo.models.loading import ModelLoadError, load_pipeline
from tests.conftest import compose

EXPECTED = {  # family -> (pipeline class, scheduler class, prediction_type, VAE scaling factor)
    "sd15": (StableDiffusionPipeline, "PNDMScheduler", "epsilon", 0.18215),
    "sd21": (StableDiffusionPipeline, "DDIMScheduler", "v_prediction", 0.18215),
    "sd21-base": (StableDiffusionPipeline, "PNDMScheduler", "epsilon", 0.18215),
    "sdxl": (StableDiffusionXLPipeline, "EulerDiscreteScheduler", "epsilon", 0.13025),
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: save_family_rehearsal(family, root / family, seed=0) for family in FAMILIES}


def load(kind, folder, *extra):
    group = "model=sd14" if kind == "pretrained" else f"model={kind}"  # `pretrained` has no conf/model file
    return load_pipeline(compose([group, f"model.kind={kind}", f"model.pretrained={folder}", "model.dtype=fp32",
                                  *extra]).model)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_folder_loads_as_its_own_class_and_generates(family, family_dirs):
    pipe_cls, scheduler, prediction, scaling = EXPECTED[family]
    pipe = load(family, family_dirs[family])
    assert type(pipe) is pipe_cls
    assert type(pipe.scheduler).__name__ == scheduler and pipe.scheduler.config.prediction_type == prediction
    assert pipe.vae.config.scaling_factor == scaling
    built = family_pipeline(family, seed=0)
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in built.unet.state_dict().items())
    image = pipe(prompt="a photo of a church", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(image)).all()


def test_sdxl_keeps_its_two_towers_and_empty_prompt_zeros(family_dirs):
    pipe = load("sdxl", family_dirs["sdxl"])
    assert pipe.config.force_zeros_for_empty_prompt is True
    assert not hasattr(pipe, "safety_checker")
    assert pipe.text_encoder_2.config.projection_dim == families.SDXL_D_POOL
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.projection_class_embeddings_input_dim == families.SDXL_D_POOL + 6 * unet.addition_time_embed_dim
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"
    assert pipe.scheduler.config.timestep_spacing == "leading"


def test_sd21_v_prediction_scheduler_config_survives_the_round_trip(family_dirs):
    pipe = load("sd21", family_dirs["sd21"])
    published = {k: v for k, v in SD21_SCHEDULER_CONFIG.items() if not k.startswith("_")}
    assert {k: pipe.scheduler.config[k] for k in published} == published
    assert pipe.unet.config.use_linear_projection and pipe.unet.config.upcast_attention
    assert list(pipe.unet.config.attention_head_dim) == [2, 2, 4, 4]  # SD 2's (5, 10, 20, 20) per level, scaled
    assert pipe.tokenizer.pad_token == "!" and pipe.text_encoder.config.hidden_act == "gelu"
    assert pipe.safety_checker is None


def test_model_pretrained_kind_takes_the_class_model_index_names(family_dirs):
    pipe = load("pretrained", family_dirs["sdxl"])
    assert type(pipe) is StableDiffusionXLPipeline


def test_a_family_kind_rejects_another_familys_folder(family_dirs):
    with pytest.raises(ModelLoadError, match="model.kind=sdxl expects a StableDiffusionXLPipeline"):
        load("sdxl", family_dirs["sd15"])
    with pytest.raises(ModelLoadError, match="model.kind=sd21 expects a StableDiffusionPipeline"):
        load("sd21", family_dirs["sdxl"])


def test_unsupported_pipeline_class_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelLoadError, match="FluxPipeline.*StableDiffusionXLPipeline"):
        load("pretrained", tmp_path)


def test_offline_sdxl_hub_id_fails_fast_naming_the_repo(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(compose(["model=sdxl"]).model)
    assert time.perf_counter() - start < 15
    message = str(err.value)
    assert "stabilityai/stable-diffusion-xl-base-1.0" in message and "HF_HUB_OFFLINE" in message
    assert "hf download stabilityai/stable-diffusion-xl-base-1.0" in message and "model.pretrained=" in message


def test_single_file_sdxl_checkpoint_goes_through_the_xl_class(family_dirs, tmp_path, monkeypatch):
    ckpt = tmp_path / "sd_xl_base_1.0.safetensors"
    ckpt.write_bytes(b"\x00")
    calls = []

    def from_single_file(cls, path, **kwargs):
        calls.append((cls, path, kwargs))
        return StableDiffusionXLPipeline.from_pretrained(kwargs["config"], local_files_only=True)

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_single_file", classmethod(from_single_file))
    pipe = load("sdxl", ckpt, f"model.single_file_config={family_dirs['sdxl']}")
    assert type(pipe) is StableDiffusionXLPipeline
    (cls, path, kwargs), = calls
    assert cls is StableDiffusionXLPipeline and path == str(ckpt) and kwargs["local_files_only"]
    assert "safety_checker" not in kwargs  # SDXL has none to turn off


def test_builders_are_seeded():
    a, b, c = (families.tiny_sdxl_pipeline(seed) for seed in (0, 0, 1))
    for name in ("unet", "text_encoder_2"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_cli_writes_a_loadable_folder(tmp_path, capsys):
    families.main(["sd21-base", str(tmp_path / "sd21b")])
    assert "model=sd21-base model.pretrained=" in capsys.readouterr().out
    index = json.loads((tmp_path / "sd21b" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["scheduler"] == ["diffusers", "PNDMScheduler"]


def test_sdxl_random_has_the_sdxl_base_architecture():
    """stereo/models/configs/sdxl as published: UNet 2.57 B, towers 123 M + 695 M, their widths and the pooled
    projection adding up to the UNet's cross-attention and added-conditioning inputs."""
    from stereo.models.loading import sdxl_random_pipeline

    with torch.device("meta"):
        pipe = sdxl_random_pipeline()
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert 2.56e9 < count(pipe.unet) < 2.58e9
    assert 120e6 < count(pipe.text_encoder) < 125e6 and 690e6 < count(pipe.text_encoder_2) < 700e6
    unet, d1, d2 = pipe.unet.config, pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
    assert unet.cross_attention_dim == d1 + d2 == 2048
    assert unet.projection_class_embeddings_input_dim == pipe.text_encoder_2.config.projection_dim + 6 * 256
    assert pipe.vae.config.scaling_factor == 0.13025 and type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"


def test_sd21_random_has_the_sd21_architecture():
    """stereo/models/configs/sd21 as published: UNet 866 M with 1024-wide cross-attention (the ViT-H tower's
    width), 23-layer gelu text tower, v-prediction DDIM."""
    from stereo.models.loading import sd21_random_pipeline

    with torch.device("meta"):
        pipe = sd21_random_pipeline()
    assert 860e6 < sum(p.numel() for p in pipe.unet.parameters()) < 870e6
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 1024
    assert pipe.text_encoder.config.num_hidden_layers == 23 and pipe.text_encoder.config.hidden_act == "gelu"
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.tokenizer.pad_token == "!"


@pytest.mark.parametrize("family", ["sd21", "sdxl"])
def test_family_rehearsal_takes_the_real_training_path(family, family_dirs, tmp_path, fresh_accelerate_state):
    """`model=<family> model.pretrained=DIR trainer=gpu` as a user runs it (bf16 frozen parts, CPU-sized budget):
    ESD erases through the family's own pipeline (v-prediction DDIM for 2.1, two towers + time ids for SDXL)."""
    import math

    from stereo.recipes import train

    out = train(compose([f"model={family}", f"model.pretrained={family_dirs[family]}", "model.resolution=64",
                         "model.dtype=bf16", "trainer=gpu", "budget=rehearsal", "method=esd", "concept=nudity",
                         "export.formats=[delta]", f"output_dir={tmp_path / 'run'}"]))
    assert len(out["losses"]) == 3 and all(math.isfinite(loss) for loss in out["losses"])
