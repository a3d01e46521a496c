"""Rehearsals of the launch commands (issue 11): two real processes, and the toy's checkpoint/resume CLI.

- `accelerate launch --multi_gpu --num_processes N train.py model=sd14 trainer=gpu ...` for ESD and for
  STEREO (the README's multi-GPU command trains STEREO, the default method), on 2 gloo processes on CPU
  (ENVIRONMENT.md: ACCELERATE_USE_CPU=true, and assert num_processes == 2), with `output_dir` left to
  its `${now:...}` default and the working directory in a temp folder: both ranks must write into ONE
  run folder. Rank 1 starts 1.1 s late (tests/scripts/staggered_entry.py) so `${now:%H-%M-%S}` differs.
- `python train.py trainer.checkpoint_every=50` and its resume on the toy (the issue's first report),
  at a CI budget where STE's erase and REO both cross a checkpoint boundary.
- scripts/gpu_check.sh, which only a lent GPU runs: its dry run and its memory comparison's pairing.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.conftest import rehearsal_overrides
from tests.scripts.rehearsal_checks import (
    ROOT,
    assert_export_loads,
    assert_grids,
    assert_same_tensors,
    launch_two,
    only_run_folder,
    python_cli,
    ste_tokens,
)


def assert_two_process_run(cwd, base) -> dict:
    """One run folder under cwd/outputs, made by 2 processes, with a loadable export and sample grids."""
    run = only_run_folder(cwd / "outputs", "run.json")
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["num_processes"] == 2, "the launch ran non-distributed copies (ENVIRONMENT.md)"
    assert_export_loads(base, run / "export")
    assert_grids(run)
    return manifest


@pytest.mark.slow
def test_two_process_esd_one_output_folder(sd14_rehearsal_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 train.py model=sd14 trainer=gpu method=esd
    concept=nudity trainer.cpu=true`, output_dir left to its default."""
    launch_two("train.py", *rehearsal_overrides(sd14_rehearsal_dir), "method=esd", "concept=nudity",
               "trainer.cpu=true", cwd=tmp_path, port=29617)
    assert_two_process_run(tmp_path, sd14_rehearsal_dir)


@pytest.mark.slow
def test_two_process_stereo_one_output_folder(sd14_rehearsal_dir, tmp_path):
    """The README's multi-GPU command (STEREO, the default method) under torchrun: STE rounds, one gallery,
    one token per round, REO export, all in one folder."""
    launch_two("train.py", *rehearsal_overrides(sd14_rehearsal_dir), "concept=nudity", "trainer.cpu=true",
               cwd=tmp_path, port=29619, launcher="torchrun")
    manifest = assert_two_process_run(tmp_path, sd14_rehearsal_dir)
    assert manifest["config"]["method"]["name"] == "stereo"
    run = only_run_folder(tmp_path / "outputs", "run.json")
    assert [t["round"] for t in ste_tokens(run)] == [0, 1]
    for k in range(2):
        assert (run / "ste" / f"round_{k}" / "done.json").is_file()


# The toy's defaults (STEREO on circle) with CPU-test step counts: erase 3 and REO 3 steps cross
# checkpoint_every=2, as erase 100 / REO 200 cross 50 in the command.
TOY_CI = ["method.ste.erase_steps=3", "method.reo.steps=3", "method.ste.gallery_size=2",
          "method.ste.gallery_steps=2", "method.ste.inversion.steps=2", "method.ddim_steps=4",
          "trainer.sample_steps=2", "trainer.checkpoint_every=2"]


def test_toy_checkpoint_every_then_resume_cli(tmp_path):
    """`python train.py trainer.checkpoint_every=50`, then the same with `trainer.resume=true`: both finish
    and the resumed run ends with exactly the same tokens and weights."""
    python_cli("train.py", *TOY_CI, "output_dir=first", cwd=tmp_path)
    first = tmp_path / "first"
    assert (first / "export" / "delta.safetensors").is_file()
    assert any((first / "checkpoints").iterdir()), "REO crossed checkpoint_every but saved no checkpoint"
    reference = tmp_path / "uninterrupted_delta.safetensors"
    shutil.copyfile(first / "export" / "delta.safetensors", reference)
    tokens = [t["token"] for t in ste_tokens(first)]
    python_cli("train.py", *TOY_CI, "output_dir=first", "trainer.resume=true", cwd=tmp_path)
    assert_same_tensors(first / "export" / "delta.safetensors", reference)  # REO replayed from its checkpoint
    assert [t["token"] for t in ste_tokens(first)] == tokens


def test_gpu_check_script_dry_run_lists_every_step():
    """scripts/gpu_check.sh cannot run here (no GPU); its --dry-run must parse and list every step within 8 min."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    steps = {line.split()[0]: int(line.split()[2].rstrip("s")) for line in proc.stdout.splitlines()}
    assert list(steps) == ["environment", "pytest_rehearsal", "pytest_sd14_512", "pytest_families", "phase_memory",
                           "memory_estimate", "speed_bf16_gc", "speed_compile"]
    assert sum(steps.values()) <= 470  # within 8 minutes, with time left for the summary and the copy


def test_measured_phases_pair_with_the_memory_estimate(tmp_path):
    """gpu_memory_compare.py pairs gpu_phase_memory.py's labels with benchmarks.memory's rows (after the fixes),
    lists the planned phases a cut-short run did not measure, and refuses another run's measurement."""
    from tests.scripts.gpu_memory_compare import estimate_name, main, missing_rows

    names = ["ESD-u, 1 GPU", "ESD-u, 1 GPU — before: foreach AdamW", "STE round 1 erase",
             "STE round 1 erase — before: earlier rounds kept, foreach", "STE round 1 attack (concept inversion)",
             "REO after 4 rounds (teacher batch 7×4)", "evaluation attack: UnlearnDiffAtk", "evaluation: generation"]
    assert estimate_name("train: erase", names) == "ESD-u, 1 GPU"
    assert estimate_name("train: ste1 erase", names) == "STE round 1 erase"
    assert estimate_name("inversion: <nudity-ste1>", names) == "STE round 1 attack (concept inversion)"
    assert estimate_name("train: reo", names) == "REO after 4 rounds (teacher batch 7×4)"
    assert estimate_name("attack: unlearndiffatk", names) == "evaluation attack: UnlearnDiffAtk"
    assert estimate_name("samples: esd", names) == "evaluation: generation"
    assert estimate_name("export", names) is None

    estimate = {"phases": {n: {"peak_gib": 10.0, "bar_gib": 18} for n in names}}
    measured = {"setting": "sd14-random", "device": "GPU", "torch": "2", "command": "c", "run_id": "this",
                "rounds": 2, "attacks": ["unlearndiffatk"], "complete": False,
                "phases": {"train: erase": {"peak_gib": 9.0}, "samples: esd": {"peak_gib": 5.0}}}
    assert missing_rows(measured, estimate) == ["STE round 1 erase", "STE round 1 attack (concept inversion)",
                                                "REO after 4 rounds (teacher batch 7×4)",
                                                "evaluation attack: UnlearnDiffAtk"]
    (tmp_path / "measured.json").write_text(json.dumps(measured))
    (tmp_path / "estimate.json").write_text(json.dumps(estimate))
    files = [str(tmp_path / "measured.json"), str(tmp_path / "estimate.json"), "--out", str(tmp_path / "cmp")]
    with pytest.raises(SystemExit, match="not by this run"):
        main([*files, "--run-id", "another"])
    main([*files, "--run-id", "this"])
    assert json.loads((tmp_path / "cmp.json").read_text())["missing"][0] == "STE round 1 erase"
    assert "Not measured" in (tmp_path / "cmp.md").read_text()
