"""Shared fixtures: the real Hydra configs composed and shrunk to CPU size, and tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from stereo.config import compose  # noqa: F401  (tests import it from here)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The test models are tiny: one thread avoids thread-pool overhead that dominates their step
# time (and contention with the other process in two-process tests).
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
# Small enough for a CPU step in about a second: 32 px, short DDIM chains, one latent per step.
FAST = ["model=tiny", "trainer.steps=2", "trainer.batch_size=1", "method.ddim_steps=4",
        "trainer.sample_steps=2"]


@pytest.fixture
def fast_cfg(tmp_path):
    """Compose with FAST overrides + extra ones, output in a temp folder."""

    def make(*extra: str):
        # ESD on church unless a test picks otherwise (the app's default is STEREO on the toy world)
        chosen = {e.split("=")[0] for e in extra}
        groups = [g for g in ("method=esd", "concept=church") if g.split("=")[0] not in chosen]
        return compose(FAST + groups + [f"output_dir={tmp_path / 'run'}", *extra])

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


def save_tiny_clip(folder: Path, seed: int = 0, **config_overrides) -> Path:
    """A randomly initialised CLIPModel + CLIPProcessor (32 px, truncated CLIP BPE) saved to `folder`."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from stereo.models.tiny import BOS_ID, EOS_ID, load_clip_tokenizer

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": 8192, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": BOS_ID,
                     "eos_token_id": EOS_ID, "pad_token_id": EOS_ID},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16, **config_overrides,
    )
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=load_clip_tokenizer()).save_pretrained(folder)
    return folder


# --- the SD 1.4 path, rehearsed -----------------------------------------------------------------
@pytest.fixture(scope="session")
def sd14_rehearsal_dir(tmp_path_factory):
    """An SD-1.4-shaped pipeline folder (PNDM scheduler as published, safety checker on disk; tiny widths)."""
    from stereo.models.rehearsal import save_sd14_rehearsal

    return save_sd14_rehearsal(tmp_path_factory.mktemp("sd14_rehearsal") / "pipeline")


def rehearsal_overrides(folder) -> list[str]:
    """`model=sd14 trainer=gpu` exactly as a user runs it, loaded from the rehearsal folder through the real
    branch, with bf16 frozen parts (the CPU has no fp16 convolutions under autocast) and CPU-sized budgets
    (conf/budget/rehearsal.yaml). Every other setting (batch 4, bf16 autocast, gradient checkpointing,
    checkpointing) is trainer=gpu's own."""
    return ["model=sd14", f"model.pretrained={folder}", "model.resolution=64", "model.dtype=bf16", "trainer=gpu",
            "budget=rehearsal"]


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's state is process-wide and fixes mixed precision at first use: a test that runs trainer=gpu
    (bf16) after one that left an Accelerator behind (trainer=default, evaluation) starts from a clean state."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


# --- the attack tests' concept and prompts (tests/test_attacks.py, tests/test_family_attacks.py) ----------------
@pytest.fixture
def concept():
    """A toy concept for attacks on small random models."""
    from stereo.config import ConceptConfig

    return ConceptConfig(name="circle", prompts=["circle"], kind="object", initializer_token="shape",
                         gallery_prompts=["a red circle"])


@pytest.fixture
def prompts():
    """Two evaluation prompts with their seeds and CFG scales."""
    from stereo.attacks.base import EvalPrompt

    return [EvalPrompt(i, p, 100 + i, 5.0) for i, p in enumerate(["a red circle", "a blue circle on grey"])]
