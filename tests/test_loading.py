"""Model loading: local folders round-trip, offline hub ids fail fast, erased UNets load or explain why."""

import time

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from stereo.erasure.subsets import select_trainable
from stereo.export import trainable_state_dict
from stereo.models.loading import ModelLoadError, load_pipeline, load_unet_weights, read_unet_state_dict
from tests.conftest import compose


def model_cfg(*overrides):
    return compose(list(overrides)).model


def test_local_diffusers_folder_round_trips_exactly(tiny_pipe, tiny_pipe_dir):
    pipe = load_pipeline(model_cfg("model=sd14", f"model.pretrained={tiny_pipe_dir}", "model.dtype=fp32"))
    assert pipe.safety_checker is None
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(tiny_pipe, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_dtype_applies_to_loaded_models(tiny_pipe_dir):
    pipe = load_pipeline(model_cfg("model=sd14", f"model.pretrained={tiny_pipe_dir}", "model.dtype=bf16"))
    assert pipe.unet.dtype == torch.bfloat16


def test_offline_hub_id_fails_fast_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(model_cfg("model=sd14"))
    assert time.perf_counter() - start < 15
    message = str(err.value)
    assert "CompVis/stable-diffusion-v1-4" in message and "model.pretrained=" in message
    assert "HF_HUB_OFFLINE" in message


def test_missing_local_path_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(model_cfg("model=sd14", "model.pretrained=/no/such/sd14"))


def test_folder_without_model_index_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_pipeline(model_cfg("model=sd14", f"model.pretrained={tmp_path}"))


def test_single_file_without_local_config_explains_what_is_needed(tmp_path):
    ckpt = tmp_path / "sd.safetensors"
    save_file({"x": torch.zeros(1)}, str(ckpt))
    with pytest.raises(ModelLoadError, match="single_file_config"):
        load_pipeline(model_cfg("model=sd14", f"model.pretrained={ckpt}"))


def test_unknown_model_kind():
    cfg = OmegaConf.create(OmegaConf.to_container(model_cfg()))  # untyped: the loader's own check, not the schema's
    cfg.kind = "sd99"
    with pytest.raises(ValueError, match="tiny, sd14-random, toy"):
        load_pipeline(cfg)


# -- third-party erased UNets ----------------------------------------------------------------
def perturbed(unet, subset="xattn"):
    state = {k: v + 1.0 for k, v in trainable_state_dict(unet, select_trainable(unet, subset)).items()}
    unet.requires_grad_(False)
    return state


def test_plain_state_dict_pt_loads_with_weights_only(tiny_pipe, tmp_path):
    full = {k: v + 0.5 for k, v in tiny_pipe.unet.state_dict().items()}
    torch.save({"state_dict": full}, tmp_path / "erased.pt")
    pipe = load_pipeline(model_cfg("model=tiny", f"model.unet_weights={tmp_path / 'erased.pt'}"))
    assert all(torch.equal(pipe.unet.state_dict()[k], full[k]) for k in full)


def test_subset_safetensors_overwrites_only_its_tensors(tiny_pipe, tmp_path):
    import copy

    unet = copy.deepcopy(tiny_pipe.unet)
    subset = perturbed(unet)
    save_file(subset, str(tmp_path / "esd-x.safetensors"))
    target = copy.deepcopy(tiny_pipe.unet)
    loaded = load_unet_weights(target, tmp_path / "esd-x.safetensors")
    assert loaded == sorted(subset)
    for k, v in target.state_dict().items():
        assert torch.equal(v, subset[k] if k in subset else tiny_pipe.unet.state_dict()[k])


def test_diffusers_unet_folder_loads(tiny_pipe, tmp_path):
    tiny_pipe.unet.save_pretrained(tmp_path / "unet")
    state, complete = read_unet_state_dict(tmp_path / "unet")
    assert complete and set(state) == set(tiny_pipe.unet.state_dict())


def test_key_mismatch_lists_keys(tiny_pipe, tmp_path):
    torch.save({"input_blocks.0.0.weight": torch.zeros(3)}, tmp_path / "ldm.pt")
    with pytest.raises(ModelLoadError, match="unexpected keys .*input_blocks.0.0.weight"):
        load_unet_weights(tiny_pipe.unet, tmp_path / "ldm.pt")


def test_corrupt_checkpoint_is_a_clear_error(tiny_pipe, tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_unet_weights(tiny_pipe.unet, tmp_path / "bad.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_unet_weights(tiny_pipe.unet, tmp_path / "bad.safetensors")


class Payload:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickled_objects_are_never_executed(tiny_pipe, tmp_path, capsys):
    torch.save({"conv_in.weight": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ModelLoadError, match="refuses to execute"):
        load_unet_weights(tiny_pipe.unet, tmp_path / "evil.pt")
    assert "pickle code ran" not in capsys.readouterr().out


def test_missing_weights_file(tiny_pipe):
    with pytest.raises(ModelLoadError, match="not found"):
        load_unet_weights(tiny_pipe.unet, "/no/such/unet.pt")


def test_sd14_random_has_the_sd14_architecture():
    from diffusers import UNet2DConditionModel

    from stereo.models.loading import _read_json

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_read_json("unet.json"))
    assert 855e6 < sum(p.numel() for p in unet.parameters()) < 865e6
