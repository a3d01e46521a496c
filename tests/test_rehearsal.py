"""Every `python train.py` GPU command of the README, rehearsed on the SD-1.4-shaped model (issue 11).

Each test runs a documented command with `model=sd14 model.pretrained=<rehearsal folder>`
(`rehearsal_overrides`: SD 1.4's classes and PNDM scheduler, bf16 frozen parts — the CPU has no
fp16 convolutions under autocast —, trainer=gpu's batch 4, bf16 autocast, gradient checkpointing
and checkpoints, conf/budget/rehearsal.yaml step counts), then uses what it left as a user would:
exports through diffusers, sample grids, STE token files. Kills are deterministic: an exception
that no handler catches (`Killed`) raised through a seam; the resumed result must equal the
uninterrupted one exactly. Two-process launches and the toy's CLI: tests/test_rehearsal_launch.py;
evaluate.py: tests/test_rehearsal_eval.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stereo.config import compose
from stereo.recipes import train
from tests.conftest import rehearsal_overrides
from tests.scripts.rehearsal_checks import (
    Killed,
    assert_export_loads,
    assert_grids,
    assert_same_tensors,
    assert_token_loads,
    python_cli,
    ste_tokens,
)


def sd14(folder: Path, trainer_gpu: bool = True) -> list[str]:
    """`model=sd14 [trainer=gpu]` on the rehearsal folder. Without trainer=gpu: a README line that does not set
    it, i.e. trainer=default (batch 1, fp32 student without autocast) beside half-precision frozen parts."""
    return [o for o in rehearsal_overrides(folder) if trainer_gpu or o != "trainer=gpu"]


def rehearse(folder: Path, out: Path, *overrides: str, trainer_gpu: bool = True) -> dict:
    """`python train.py <rehearsal overrides> <overrides> output_dir=<out>`, in process, from accelerate's
    initial state as a new process starts (an earlier test may have left an Accelerator behind)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    return train(compose([*sd14(folder, trainer_gpu), *overrides, f"output_dir={out}"]))


def assert_run_outputs(run: Path, base: Path) -> dict:
    """The README's promise for every run: config.yaml, run.json, export/ (loadable), samples/*.png."""
    assert (run / "config.yaml").is_file() and (run / "run.json").is_file()
    loaded = assert_export_loads(base, run / "export")
    assert_grids(run)
    return loaded


def assert_ste_rounds(run: Path, base: Path, rounds: int) -> list[dict]:
    """Each STE round finished (done.json), left its grid and a token file diffusers loads."""
    for k in range(rounds):
        round_dir = run / "ste" / f"round_{k}"
        assert (round_dir / "done.json").is_file(), f"STE round {k} did not finish"
        assert_grids(round_dir, "grid.png")
    tokens = ste_tokens(run)
    assert sorted({t["round"] for t in tokens}) == list(range(rounds))
    assert_token_loads(base, run / "ste" / tokens[-1]["file"])
    return tokens


@pytest.fixture(scope="module")
def stereo_run(sd14_rehearsal_dir, tmp_path_factory):
    """`python train.py method=stereo model=sd14 trainer=gpu concept=nudity method.ste.rounds=2`, uninterrupted:
    the reference for the resume tests."""
    out = tmp_path_factory.mktemp("stereo") / "run"
    rehearse(sd14_rehearsal_dir, out, "method=stereo", "concept=nudity", "method.ste.rounds=2")
    return out


# --- ESD -----------------------------------------------------------------------------------------
def test_esd_nudity_cli(sd14_rehearsal_dir, tmp_path):
    """`python train.py method=esd model=sd14 trainer=gpu concept=nudity` from a fresh working directory."""
    python_cli("train.py", *rehearsal_overrides(sd14_rehearsal_dir), "method=esd", "concept=nudity",
               "output_dir=run", cwd=tmp_path)
    run = tmp_path / "run"
    assert_run_outputs(run, sd14_rehearsal_dir)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["trainer"]["batch_size"] == 4 and config["trainer"]["mixed_precision"] == "bf16"
    assert config["trainer"]["gradient_checkpointing"] is True
    assert any((run / "checkpoints").iterdir()), "trainer=gpu checkpoints, but the run saved none"


def test_esd_lora_export_lora_vangogh(sd14_rehearsal_dir, tmp_path):
    """`python train.py method=esd_lora export=lora model=sd14 concept=vangogh`: an adapter diffusers loads."""
    rehearse(sd14_rehearsal_dir, tmp_path / "run", "method=esd_lora", "export=lora", "concept=vangogh",
             trainer_gpu=False)
    loaded = assert_run_outputs(tmp_path / "run", sd14_rehearsal_dir)
    assert "lora" in loaded


def test_esd_export_all(sd14_rehearsal_dir, tmp_path):
    """`export=all`: unet/, pipeline/ and delta all load, and the run goes on after the pipeline export
    (sample grids are generated after it)."""
    rehearse(sd14_rehearsal_dir, tmp_path / "run", "method=esd", "concept=church", "export=all")
    loaded = assert_run_outputs(tmp_path / "run", sd14_rehearsal_dir)
    assert {"unet", "pipeline", "delta"} <= loaded.keys()


def test_esd_several_concepts(sd14_rehearsal_dir, tmp_path):
    """`python train.py method=esd model=sd14 concept=[church,parachute]`: one run erases both."""
    rehearse(sd14_rehearsal_dir, tmp_path / "run", "method=esd", "concept=[church,parachute]", trainer_gpu=False)
    assert_run_outputs(tmp_path / "run", sd14_rehearsal_dir)
    manifest = json.loads((tmp_path / "run" / "export" / "manifest.json").read_text())
    assert sorted(manifest["config"]["concepts"]) == ["church", "parachute"]


def test_experiment_sd14_nudity_esd(sd14_rehearsal_dir, tmp_path):
    """`python train.py experiment=sd14_nudity_esd` with the rehearsal model and a CPU step count (the
    experiment's own 200 steps would take an hour here); its batch 1 and lr stay."""
    rehearse(sd14_rehearsal_dir, tmp_path / "run", "experiment=sd14_nudity_esd", "trainer.steps=3")
    assert_run_outputs(tmp_path / "run", sd14_rehearsal_dir)
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["method"]["name"] == "esd" and config["trainer"]["batch_size"] == 1
    assert config["model"]["pretrained"] == str(sd14_rehearsal_dir)


def test_multirun_sweep(sd14_rehearsal_dir, tmp_path):
    """`python train.py --multirun method=esd model=sd14 concept=church,parachute,tench` (two of the three jobs):
    one finished run per job, each directly under the sweep folder."""
    python_cli("train.py", "--multirun", *sd14(sd14_rehearsal_dir, trainer_gpu=False), "method=esd",
               "concept=church,parachute", "output_dir=sweep", cwd=tmp_path)
    jobs = sorted(p.parent for p in (tmp_path / "sweep").rglob("run.json"))
    assert len(jobs) == 2, f"expected 2 sweep jobs with run.json, got {jobs}"
    # a local model.pretrained=/path (the README's offline route) must not nest the job folders
    assert all(job.parent == tmp_path / "sweep" for job in jobs), f"sweep jobs not directly under sweep/: {jobs}"
    for job, concept in zip(jobs, ("church", "parachute")):
        assert concept in job.name
        assert_run_outputs(job, sd14_rehearsal_dir)


# --- STEREO --------------------------------------------------------------------------------------
def test_stereo_two_rounds(stereo_run, sd14_rehearsal_dir):
    """`python train.py method=stereo model=sd14 trainer=gpu concept=nudity method.ste.rounds=2`."""
    assert_ste_rounds(stereo_run, sd14_rehearsal_dir, rounds=2)
    assert_run_outputs(stereo_run, sd14_rehearsal_dir)


def test_next_ste_rounds_student_is_prepared_again(fresh_accelerate_state):
    """Round k's erased UNet is a frozen copy of round k's prepared student, and round k+1's student a copy of
    it: accelerate must prepare that student again (bf16 autocast; the DDP wrapper on several processes),
    not skip it as "already prepared"."""
    import copy

    import torch
    from accelerate import Accelerator

    from stereo.generation import frozen_copy
    from stereo.models.tiny import tiny_unet

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    student = accelerator.prepare(tiny_unet())
    erased = frozen_copy(accelerator.unwrap_model(student), torch.bfloat16, accelerator.device)
    next_student = accelerator.prepare(copy.deepcopy(erased).float())
    assert "_original_forward" in vars(next_student), "accelerate skipped the next round's student"


def test_stereo_reference(sd14_rehearsal_dir, tmp_path):
    """`python train.py method=stereo_reference model=sd14 trainer=gpu concept=nudity` (rounds from the budget)."""
    rehearse(sd14_rehearsal_dir, tmp_path / "run", "method=stereo_reference", "concept=nudity")
    assert_ste_rounds(tmp_path / "run", sd14_rehearsal_dir, rounds=2)
    assert_run_outputs(tmp_path / "run", sd14_rehearsal_dir)


def test_reo_only(sd14_rehearsal_dir, tmp_path):
    """`python train.py method=reo model=sd14 trainer=gpu concept=nudity`."""
    rehearse(sd14_rehearsal_dir, tmp_path / "run", "method=reo", "concept=nudity")
    assert_run_outputs(tmp_path / "run", sd14_rehearsal_dir)


def test_stage_ste_then_stage_reo(sd14_rehearsal_dir, tmp_path):
    """`method.stage=ste output_dir=A`, then `method.stage=reo method.ste_dir=A` in a new run."""
    ste_dir = tmp_path / "ste-nudity"
    rehearse(sd14_rehearsal_dir, ste_dir, "method=stereo", "method.stage=ste", "concept=nudity")
    tokens = assert_ste_rounds(ste_dir, sd14_rehearsal_dir, rounds=2)
    assert not (ste_dir / "export").exists(), "stage=ste only searches; it must not export"
    rehearse(sd14_rehearsal_dir, tmp_path / "reo", "method=stereo", "method.stage=reo", f"method.ste_dir={ste_dir}",
             "concept=nudity")
    assert_run_outputs(tmp_path / "reo", sd14_rehearsal_dir)
    manifest = json.loads((tmp_path / "reo" / "export" / "manifest.json").read_text())
    assert manifest["adversarial_tokens"] == [t["token"] for t in tokens]


# --- kill and resume -----------------------------------------------------------------------------
def assert_same_result(resumed: Path, reference: Path) -> None:
    """Resumed == uninterrupted: the same tokens (names and vectors), round deltas and final weights."""
    assert [t["token"] for t in ste_tokens(resumed)] == [t["token"] for t in ste_tokens(reference)]
    for token in ste_tokens(reference):
        assert_same_tensors(resumed / "ste" / token["file"], reference / "ste" / token["file"])
    for round_dir in sorted((reference / "ste").glob("round_*")):
        assert_same_tensors(resumed / "ste" / round_dir.name / "unet_delta.safetensors",
                            round_dir / "unet_delta.safetensors")
    assert_same_tensors(resumed / "export" / "delta.safetensors", reference / "export" / "delta.safetensors")


def kill_after_first_checkpoint(monkeypatch, what: str) -> None:
    """The next run dies right after its first checkpoint is complete on disk."""
    from stereo.erasure.trainer import ErasureTrainer

    original = ErasureTrainer.save_checkpoint

    def killed_after_checkpoint(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise Killed(f"killed after the first {what} checkpoint")

    monkeypatch.setattr(ErasureTrainer, "save_checkpoint", killed_after_checkpoint)


def test_kill_in_esd_after_checkpoint_then_resume_equals_uninterrupted(sd14_rehearsal_dir, tmp_path, monkeypatch):
    """`python train.py method=esd ... trainer.resume=true` (continue after a crash), trainer=gpu checkpoints."""
    overrides = ("method=esd", "concept=nudity", "export.formats=[delta]")
    rehearse(sd14_rehearsal_dir, tmp_path / "reference", *overrides)
    kill_after_first_checkpoint(monkeypatch, "ESD")
    run = tmp_path / "run"
    with pytest.raises(Killed):
        rehearse(sd14_rehearsal_dir, run, *overrides)
    monkeypatch.undo()
    rehearse(sd14_rehearsal_dir, run, *overrides, "trainer.resume=true")
    assert_same_tensors(run / "export" / "delta.safetensors", tmp_path / "reference" / "export" / "delta.safetensors")


def test_kill_in_ste_round_then_rerun_equals_uninterrupted(stereo_run, sd14_rehearsal_dir, tmp_path, monkeypatch):
    """Killed during STE round 1 (its concept inversion, after round 0 finished); the re-run keeps round 0,
    redoes round 1 from its start and ends exactly where the uninterrupted run ended."""
    import stereo.attacks.inversion
    import stereo.recipes.stereo

    original, calls = stereo.attacks.inversion.learn_token, []

    def killed_in_round_1(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Killed("killed during STE round 1")
        return original(*args, **kwargs)

    for module in (stereo.attacks.inversion, stereo.recipes.stereo):
        if hasattr(module, "learn_token"):
            monkeypatch.setattr(module, "learn_token", killed_in_round_1)
    run = tmp_path / "run"
    overrides = ("method=stereo", "concept=nudity", "method.ste.rounds=2")
    with pytest.raises(Killed):
        rehearse(sd14_rehearsal_dir, run, *overrides)
    assert (run / "ste" / "round_0" / "done.json").is_file() and not (run / "ste" / "round_1" / "done.json").exists()
    monkeypatch.undo()
    rehearse(sd14_rehearsal_dir, run, *overrides, "trainer.resume=true")
    assert_same_result(run, stereo_run)


def test_kill_in_reo_after_checkpoint_then_resume_equals_uninterrupted(stereo_run, sd14_rehearsal_dir, tmp_path,
                                                                      monkeypatch):
    """Killed right after REO's first checkpoint (STE erase does not checkpoint: a finished round is its
    checkpoint); `trainer.resume=true` reloads the STE rounds and the REO checkpoint and ends exactly
    where the uninterrupted run ended (the REO student gets REO's weights, not an STE round's)."""
    kill_after_first_checkpoint(monkeypatch, "REO")
    run = tmp_path / "run"
    overrides = ("method=stereo", "concept=nudity", "method.ste.rounds=2")
    with pytest.raises(Killed):
        rehearse(sd14_rehearsal_dir, run, *overrides)
    assert (run / "ste" / "round_1" / "done.json").is_file(), "the kill should come after STE, during REO"
    assert not (run / "export").exists()
    monkeypatch.undo()
    rehearse(sd14_rehearsal_dir, run, *overrides, "trainer.resume=true")
    assert_same_result(run, stereo_run)
