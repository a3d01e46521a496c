"""Released checkpoints from the Hub (a stand-in server, tests/hub_server.py) or a local copy: what is fetched,
what is recorded, the errors a user can hit; and erased text encoders in each layout third parties ship."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from stereo.models.components import apply_component, load_text_encoder_weights
from stereo.models.hub import HubSource, fetch, sha256_of
from stereo.models.loading import ModelLoadError
from stereo.models.tiny import tiny_pipeline, tiny_text_encoder, tiny_unet
from tests.hub_server import COMMIT, FakeHub, go_online

REPO = "org/erased"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = FakeHub()
    server.add_file(REPO, "esd-u.safetensors", b"esd weights")
    server.add_file(REPO, "te/config.json", b"{}")
    server.add_file(REPO, "te/model.safetensors", b"text encoder weights")
    go_online(monkeypatch, tmp_path, server.start().url)
    yield server
    server.stop()


def test_a_hub_file_is_fetched_with_its_commit_and_sha256(hub):
    got = fetch(HubSource(REPO, filename="esd-u.safetensors"))
    assert got.path.read_bytes() == b"esd weights"
    digest = hashlib.sha256(b"esd weights").hexdigest()
    assert got.record == {"repo": REPO, "file": "esd-u.safetensors", "revision": None, "commit": COMMIT,
                          "path": str(got.path), "sha256": digest}


def test_a_hub_subfolder_is_fetched_whole_and_nothing_else(hub):
    got = fetch(HubSource(REPO, subfolder="te"))
    assert sorted(p.name for p in got.path.iterdir()) == ["config.json", "model.safetensors"]
    assert got.record["files"]["model.safetensors"] == hashlib.sha256(b"text encoder weights").hexdigest()
    assert got.record["sha256"] == sha256_of(got.path)
    assert not any("esd-u" in path for _, path in hub.requests)


def test_a_pinned_revision_is_what_is_asked_for_and_recorded(hub):
    got = fetch(HubSource(REPO, filename="esd-u.safetensors", revision="v1.0"))
    assert ("GET", f"/{REPO}/resolve/v1.0/esd-u.safetensors") in hub.requests
    assert got.record["revision"] == "v1.0" and got.record["commit"] == COMMIT


def test_a_cached_file_needs_no_network(hub, monkeypatch):
    first = fetch(HubSource(REPO, filename="esd-u.safetensors"))
    hub.stop()
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert fetch(HubSource(REPO, filename="esd-u.safetensors")).path == first.path


def test_an_expected_sha256_that_differs_is_an_error(hub):
    right = hashlib.sha256(b"esd weights").hexdigest()
    assert fetch(HubSource(REPO, filename="esd-u.safetensors", sha256=right)).record["sha256"] == right
    mismatch = f"sha256 mismatch for {REPO}/esd-u.safetensors.*expected 00+, got {right}"
    with pytest.raises(ModelLoadError, match=mismatch):
        fetch(HubSource(REPO, filename="esd-u.safetensors", sha256="0" * 64))


def test_a_file_or_repo_the_hub_does_not_have_is_named(hub):
    with pytest.raises(ModelLoadError, match=f"{REPO}/missing.pt .*does not exist in the repo"):
        fetch(HubSource(REPO, filename="missing.pt"))
    with pytest.raises(ModelLoadError, match="no files under 'nowhere'"):
        fetch(HubSource(REPO, subfolder="nowhere"))
    with pytest.raises(ModelLoadError, match="org/unknown does not exist or is private"):
        fetch(HubSource("org/unknown", filename="x.pt"))


def test_offline_and_not_cached_says_what_and_how_to_provide_it(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as error:
        fetch(HubSource("OPTML-Group/AdvUnlearn", subfolder="nudity_unlearned", revision="abc123"))
    message = str(error.value)
    for part in ("OPTML-Group/AdvUnlearn/nudity_unlearned (revision abc123)", "HF_HUB_OFFLINE is set",
                 "hf download OPTML-Group/AdvUnlearn --include 'nudity_unlearned/*' --revision abc123 "
                 "--local-dir DIR", "give the local folder DIR instead of the hub id"):
        assert part in message
    assert hub.requests == []


def test_an_unreachable_hub_fails_fast_with_the_same_advice(monkeypatch, tmp_path):
    go_online(monkeypatch, tmp_path, "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(ModelLoadError, match=r"org/erased/esd-u.pt \(revision main\) .*unreachable.*--local-dir"):
        fetch(HubSource(REPO, filename="esd-u.pt"))


def test_a_local_copy_stands_in_for_the_repo(tmp_path):
    (tmp_path / "copy" / "te").mkdir(parents=True)
    (tmp_path / "copy" / "te" / "model.safetensors").write_bytes(b"w")
    (tmp_path / "copy" / ".cache").mkdir()  # what `hf download --local-dir` leaves: not hashed
    (tmp_path / "copy" / ".cache" / "x").write_bytes(b"metadata")
    folder = fetch(HubSource(str(tmp_path / "copy"), subfolder="te"))
    assert folder.path == tmp_path / "copy" / "te" and folder.record["commit"] is None
    whole = fetch(HubSource(str(tmp_path / "copy")))
    assert list(whole.record["files"]) == ["te/model.safetensors"]
    one = fetch(HubSource(str(tmp_path / "copy" / "te" / "model.safetensors"), filename="ignored.pt"))
    assert one.path.name == "model.safetensors"
    with pytest.raises(ModelLoadError, match="does not exist"):
        fetch(HubSource(str(tmp_path / "copy"), filename="other.pt"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        fetch(HubSource(str(tmp_path / "nowhere")))


# --- erased text encoders (AdvUnlearn ships a CLIPTextModel folder; others a state dict) --------------------
def erased_text_encoder() -> torch.nn.Module:
    torch.manual_seed(1)
    return tiny_text_encoder()


def save_layout(encoder, tmp_path, layout: str):
    if layout == "folder":
        encoder.save_pretrained(tmp_path / "nudity_unlearned")
        return tmp_path / "nudity_unlearned"
    if layout == "safetensors":
        save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(tmp_path / "te.safetensors"))
        return tmp_path / "te.safetensors"
    torch.save(encoder.state_dict(), tmp_path / "te.pt")
    return tmp_path / "te.pt"


@pytest.mark.parametrize("layout", ["folder", "safetensors", "pt"])
def test_an_erased_text_encoder_loads_from_each_layout(tmp_path, layout):
    erased = erased_text_encoder()
    target = tiny_text_encoder()
    loaded = load_text_encoder_weights(target, save_layout(erased, tmp_path, layout))
    assert loaded == sorted(erased.state_dict())
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in erased.state_dict().items())


@pytest.mark.parametrize("prefix", ["text_model.", "module.text_model.", "module.", "text_encoder."])
def test_a_text_encoder_state_dict_loads_under_any_naming_it_is_shipped_with(tmp_path, prefix):
    """transformers < 5 (and released checkpoints) name tensors text_model.<name>; 5 drops the prefix."""
    erased = erased_text_encoder().state_dict()
    bare = {k.removeprefix("text_model."): v for k, v in erased.items()}
    torch.save({prefix + k: v for k, v in bare.items()}, tmp_path / "te.pt")
    target = tiny_text_encoder()
    load_text_encoder_weights(target, tmp_path / "te.pt")
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in erased.items())


def test_a_text_encoder_of_another_architecture_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match=r"does not match this text encoder: .*shape mismatches"):
        load_text_encoder_weights(tiny_text_encoder(), save_layout(tiny_text_encoder(hidden=32), tmp_path, "pt"))
    partial = {k: v for k, v in erased_text_encoder().state_dict().items() if "layers.0" in k}
    torch.save(partial, tmp_path / "partial.pt")  # a .pt claims to be complete
    with pytest.raises(ModelLoadError, match=r"[1-9]\d* missing keys"):
        load_text_encoder_weights(tiny_text_encoder(), tmp_path / "partial.pt")
    save_file(tiny_unet().state_dict(), str(tmp_path / "unet.safetensors"))
    with pytest.raises(ModelLoadError, match="unexpected keys"):
        load_text_encoder_weights(tiny_text_encoder(), tmp_path / "unet.safetensors")


def test_components_go_where_they_belong(tmp_path):
    """ESD-style UNet subset (.safetensors), raw .pt UNet state dict, diffusers UNet folder, text encoder."""
    torch.manual_seed(2)
    erased_unet = tiny_unet().state_dict()
    subset = {k: v for k, v in erased_unet.items() if "attn2" not in k}  # ESD-u trains all but cross-attention
    save_file(subset, str(tmp_path / "esd-u.safetensors"))
    torch.save(erased_unet, tmp_path / "unet.pt")
    unet = tiny_unet()
    unet.load_state_dict(erased_unet)
    unet.save_pretrained(tmp_path / "unet_folder")
    for path, expected in ((tmp_path / "esd-u.safetensors", subset), (tmp_path / "unet.pt", erased_unet),
                           (tmp_path / "unet_folder", erased_unet)):
        pipe = tiny_pipeline()
        before = pipe.text_encoder.state_dict()
        apply_component(pipe, "unet", path)
        assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in expected.items())
        assert all(torch.equal(v, pipe.text_encoder.state_dict()[k]) for k, v in before.items())
    pipe = tiny_pipeline()
    apply_component(pipe, "text_encoder", save_layout(erased_text_encoder(), tmp_path, "folder"))
    assert all(torch.equal(v, pipe.text_encoder.state_dict()[k]) for k, v in erased_text_encoder().state_dict().items())
    with pytest.raises(ValueError, match="component='vae' is not valid"):
        apply_component(pipe, "vae", tmp_path)


def test_a_lora_file_and_a_token_file_load_as_their_components(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny_unet()
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_k", "to_v"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet))
    [lora_file] = (tmp_path / "lora").glob("*.safetensors")
    pipe = tiny_pipeline()
    x, cond = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 64)
    before = pipe.unet(x, 10, encoder_hidden_states=cond).sample
    apply_component(pipe, "lora", lora_file)
    assert not torch.allclose(pipe.unet(x, 10, encoder_hidden_states=cond).sample, before)
    save_file({"<erased>": torch.randn(1, 64)}, str(tmp_path / "token.safetensors"))
    apply_component(pipe, "textual_inversion", tmp_path / "token.safetensors")
    assert "<erased>" in pipe.tokenizer.get_vocab()
