"""Shared fixtures: the real Hydra configs composed and shrunk to CPU size, and tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stereo.config import compose  # noqa: F401  (tests import it from here)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
# Small enough for a CPU step in about a second: 32 px, short DDIM chains, one latent per step.
FAST = ["model=tiny", "trainer.steps=2", "trainer.batch_size=1", "method.ddim_steps=4",
        "trainer.sample_steps=2"]


@pytest.fixture
def fast_cfg(tmp_path):
    """Compose with FAST overrides + extra ones, output in a temp folder."""

    def make(*extra: str):
        return compose(FAST + [f"output_dir={tmp_path / 'run'}", *extra])

    return make


@pytest.fixture(scope="session")
def tiny_pipe():
    from stereo.models.tiny import tiny_pipeline

    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory, tiny_pipe):
    path = tmp_path_factory.mktemp("tiny_pipe")
    tiny_pipe.save_pretrained(path)
    return path
