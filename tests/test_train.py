"""ESD training end to end on the tiny model: what trains, what exports, what resumes."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from stereo.erasure.trainer import NonFiniteLossError
from stereo.generation import generate
from stereo.manifest import sha256_file
from stereo.models.loading import load_pipeline, load_unet_weights
from stereo.train import train
from tests.conftest import ROOT


def base_unet(cfg):
    return load_pipeline(cfg.model).unet


@pytest.mark.parametrize("subset", ["xattn", "noxattn"])
def test_one_step_moves_the_subset_and_nothing_else(fast_cfg, subset):
    cfg = fast_cfg(f"method.subset={subset}", "trainer.steps=1", "trainer.lr=1e-3", "export.formats=[delta]")
    before = base_unet(cfg).state_dict()
    out = train(cfg)
    after = out["unet"].state_dict()
    trained = set(out["trainable"])
    assert trained and all(("attn2" in k) == (subset == "xattn") for k in trained)
    moved = [k for k in trained if not torch.equal(before[k], after[k])]
    assert len(moved) >= 0.9 * len(trained), f"only {len(moved)}/{len(trained)} trainable tensors moved"
    for k in set(before) - trained:
        assert torch.equal(before[k], after[k]), f"frozen tensor {k} changed"


def test_export_reloads_in_diffusers_and_draws_the_same_images(fast_cfg):
    cfg = fast_cfg("trainer.lr=1e-3", "export=all")
    out = train(cfg)
    export = out["export_dir"]
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["subset"] == "noxattn"
    assert manifest["config"]["concepts"]["church"]["prompts"] == ["church"]
    assert manifest["versions"]["diffusers"] and "git_commit" in manifest
    for rel, digest in manifest["files"].items():
        assert sha256_file(export / rel) == digest

    pipe = load_pipeline(cfg.model)
    in_memory = generate(pipe.__class__(**{**pipe.components, "unet": out["unet"]}), ["church"], [3], steps=3)
    pipe.unet = UNet2DConditionModel.from_pretrained(export / "unet")
    reloaded = generate(pipe, ["church"], [3], steps=3)
    assert list(in_memory[0].getdata()) == list(reloaded[0].getdata())

    full = StableDiffusionPipeline.from_pretrained(export / "pipeline", local_files_only=True)
    assert all(torch.equal(full.unet.state_dict()[k], v) for k, v in out["unet"].state_dict().items())
    base = base_unet(cfg)
    load_unet_weights(base, export / "delta.safetensors")
    assert all(torch.equal(base.state_dict()[k], v) for k, v in out["unet"].state_dict().items())


def test_lora_export_loads_with_load_lora_weights(fast_cfg):
    cfg = fast_cfg("method=esd_lora", "export=lora", "trainer.lr=1e-2", "method.lora.alpha=4", "method.lora.rank=2")
    out = train(cfg)
    assert all("lora" in n for n in out["trainable"])
    pipe = load_pipeline(cfg.model)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipe.unet(x, 500, encoder_hidden_states=emb).sample
        ours = out["unet"](x, 500, encoder_hidden_states=emb).sample
        pipe.load_lora_weights(out["export_dir"] / "lora")
        loaded = pipe.unet(x, 500, encoder_hidden_states=emb).sample
        merged_unet = UNet2DConditionModel.from_pretrained(out["export_dir"] / "unet")
        merged = merged_unet(x, 500, encoder_hidden_states=emb).sample
    assert not torch.allclose(before, ours, atol=1e-4), "the adapter did not learn anything"
    torch.testing.assert_close(loaded, ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged, ours, atol=1e-4, rtol=1e-4)


class Interrupt(Exception):
    pass


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(fast_cfg, tmp_path, monkeypatch):
    common = ["trainer.steps=4", "trainer.checkpoint_every=2", "trainer.lr=1e-3", "export.formats=[delta]"]
    straight = train(fast_cfg(*common, f"output_dir={tmp_path / 'straight'}"))["unet"].state_dict()

    from stereo.erasure import session as session_module

    def crash_at_step_3(self, step, metrics):
        if step == 3:
            raise Interrupt
    monkeypatch.setattr(session_module.Session, "log", crash_at_step_3)
    with pytest.raises(Interrupt):
        train(fast_cfg(*common, f"output_dir={tmp_path / 'resumed'}"))
    assert (tmp_path / "resumed" / "checkpoints" / "step_0000002").is_dir()
    assert not (tmp_path / "resumed" / "export").exists()
    monkeypatch.undo()
    resumed = train(fast_cfg(*common, f"output_dir={tmp_path / 'resumed'}", "trainer.resume=true"))
    assert resumed["losses"] and len(resumed["losses"]) == 2  # only steps 3 and 4 ran
    for k, v in straight.items():
        assert torch.equal(v, resumed["unet"].state_dict()[k]), k


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(fast_cfg, tmp_path, monkeypatch):
    from stereo.erasure import trainer as trainer_module

    calls = {"n": 0}
    real = trainer_module.erasure_loss

    def poisoned(eps, target):
        calls["n"] += 1
        loss = real(eps, target)
        return loss * float("nan") if calls["n"] == 3 else loss
    monkeypatch.setattr(trainer_module, "erasure_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 3.*step_0000002"):
        train(fast_cfg("trainer.steps=4", "trainer.checkpoint_every=2"))
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step_0000002" / "checkpoint.json").is_file()
    assert not (run / "export").exists()


def test_a_failed_export_leaves_no_complete_looking_folder_and_keeps_the_old_one(fast_cfg, tmp_path, monkeypatch):
    from stereo import export as export_module

    cfg = fast_cfg("trainer.steps=1")
    train(cfg)
    export = tmp_path / "run" / "export"
    old_manifest = (export / "manifest.json").read_text()

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(export_module, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        train(cfg)
    assert (export / "manifest.json").read_text() == old_manifest
    assert [p.name for p in export.parent.iterdir() if p.name.startswith(".export")] == []


def test_batch_accumulation_and_several_concepts(fast_cfg):
    out = train(fast_cfg("concept=[church,parachute]", "trainer.batch_size=3", "trainer.grad_accum=2",
                         "export.formats=[delta]"))
    manifest = json.loads((out["export_dir"] / "manifest.json").read_text())
    assert manifest["erased"] == ["church", "parachute"]
    assert len(out["losses"]) == 2


def test_wandb_offline_logger_writes_a_run(fast_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    train(fast_cfg("logger=wandb", "logger.mode=offline", "trainer.steps=2"))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs, "no offline wandb run written"
    assert list(runs[0].glob("*.wandb"))


def test_run_writes_config_and_provenance(fast_cfg, tmp_path):
    train(fast_cfg("seed=7", "trainer.steps=1"))
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["seed"] == 7 and run["config"]["seed"] == 7 and run["versions"]["torch"]
    assert "seed: 7" in (tmp_path / "run" / "config.yaml").read_text()


def test_cli_multirun_sweeps_concepts(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), "--multirun", "concept=church,parachute", "model=tiny", "method=esd",
           "trainer.steps=1", "method.ddim_steps=3", "trainer.sample_steps=2", "export.formats=[delta]",
           f"output_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / "export" / "manifest.json").is_file())
    assert len(jobs) == 2
    erased = [json.loads((j / "export" / "manifest.json").read_text())["erased"] for j in jobs]
    assert sorted(erased) == [["church"], ["parachute"]]


def test_sample_grids_during_training(fast_cfg, tmp_path):
    train(fast_cfg("trainer.steps=2", "trainer.sample_every=1", "export.formats=[delta]"))
    samples = sorted(p.name for p in (tmp_path / "run" / "samples").glob("*.png"))
    assert samples == ["esd.png", "esd_step0000001.png", "esd_step0000002.png"]
