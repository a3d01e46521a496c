"""ESD training end to end on the tiny model: what trains, what exports, what resumes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from stereo.erasure.trainer import NonFiniteLossError
from stereo.generation import generate
from stereo.manifest import sha256_file
from stereo.models.loading import load_pipeline, load_unet_weights
from stereo.recipes import train
from tests.conftest import ROOT, compose, rehearsal_overrides


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

    from stereo.erasure.context import RunContext

    def crash_at_step_3(self, step, metrics):
        if step == 3:
            raise Interrupt
    monkeypatch.setattr(RunContext, "log", crash_at_step_3)
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
    assert run["torch_threads"] == torch.get_num_threads()  # another count gives other weights on a CPU
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


def test_two_processes_share_rank_0s_output_folder_and_anchors(tmp_path):
    """`${now:...}` resolves per process, and an LLM answers each request differently: rank 0's result is used."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "scripts" / "two_rank_session.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert reports[0]["num_processes"] == 2
    assert reports[0]["output_dir"] == reports[1]["output_dir"] == reports[1]["config_output_dir"]
    assert [p.name for p in tmp_path.glob("run_*")] == [Path(reports[0]["output_dir"]).name]
    assert reports[0]["anchors"] == reports[1]["anchors"] == ["a quiet village street seen by process 0"]


def test_accelerator_buckets_gradients_as_views_and_waits_the_configured_time(fast_cfg):
    from datetime import timedelta

    from accelerate.state import AcceleratorState

    from stereo.erasure.context import make_accelerator

    accelerator = make_accelerator(fast_cfg("trainer.dist_timeout_minutes=25"))
    AcceleratorState._reset_state()  # as RunContext.close does: later tests choose their own mixed precision
    assert accelerator.ddp_handler.gradient_as_bucket_view
    assert accelerator.init_handler.timeout == timedelta(minutes=25)


def test_sd14_samples_and_export_all_keep_the_student_and_shared_pipeline(sd14_rehearsal_dir, tmp_path,
                                                                          fresh_accelerate_state):
    """SD 1.4's bf16 pipeline, trainer=gpu: the sample grid draws from a frozen copy of the fp32 student in the
    pipeline's dtype, and export=all saves the pipeline from where it is (it once moved it to the CPU for good)."""
    from stereo.erasure.context import RunContext
    from stereo.recipes.esd import run_esd

    cfg = compose(rehearsal_overrides(sd14_rehearsal_dir) + ["method=esd", "concept=nudity", "export=all",
                                                              f"output_dir={tmp_path / 'run'}"])
    with RunContext(cfg) as ctx:
        moves = []
        to = ctx.pipe.to
        ctx.pipe.to = lambda *args, **kwargs: moves.append((args, kwargs)) or to(*args, **kwargs)
        out = run_esd(ctx)
    assert moves == [] and ctx.pipe.unet is ctx.base_unet
    assert {m.dtype for m in (ctx.pipe.unet, ctx.pipe.vae, ctx.pipe.text_encoder)} == {torch.bfloat16}
    assert out["samples"].is_file()
    assert out["unet"].dtype == torch.float32 and all(out["unet"].get_parameter(n).requires_grad
                                                       for n in out["trainable"])
    exported = StableDiffusionPipeline.from_pretrained(out["export_dir"] / "pipeline", local_files_only=True)
    assert exported(["nudity"], num_inference_steps=2, height=64, width=64, output_type="np").images.shape == (
        1, 64, 64, 3)


def test_runs_in_one_process_may_choose_different_mixed_precision(fast_cfg):
    """A --multirun sweep (or a notebook) runs jobs in one process; accelerate fixes mixed precision at first use."""
    train(fast_cfg("trainer.steps=1", "export.formats=[delta]"))
    out = train(fast_cfg("trainer.steps=1", "export.formats=[delta]", "trainer.mixed_precision=bf16"))
    assert len(out["losses"]) == 1
