"""A real two-process data-parallel run (torchrun + gloo on CPU)."""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_two_processes_train_identical_weights(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(ROOT / "tests" / "scripts" / "ddp_train.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["num_processes"] == 2 for r in reports)
    assert reports[0]["checksum"] == reports[1]["checksum"]  # weights equal across ranks
    assert reports[0]["moved"] and reports[1]["moved"]
    assert reports[0]["first_loss"] != reports[1]["first_loss"]  # each rank drew its own latents
    # gradient accumulation (2 steps x 2 micro-steps): one all-reduce per optimiser step, ranks still agree
    assert [r["gradient_syncs"] for r in reports] == [2, 2]
    assert reports[0]["accumulated_checksum"] == reports[1]["accumulated_checksum"]
    assert all(r["released"] for r in reports)  # closing the trainer freed its DDP wrapper and optimiser
    assert (tmp_path / "run" / "export" / "manifest.json").is_file()
