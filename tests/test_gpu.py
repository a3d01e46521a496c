"""GPU-only checks (skipped without CUDA; CI has none). Run on a GPU machine: pytest -m gpu."""

import pytest
import torch

from stereo.train import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_gradient_checkpointing_erase_on_gpu(fast_cfg):
    out = train(fast_cfg("trainer.mixed_precision=bf16", "trainer.gradient_checkpointing=true",
                         "trainer.batch_size=4", "export.formats=[delta]"))
    assert all(torch.isfinite(torch.tensor(out["losses"])))


def test_sd14_noxattn_erase_fits_in_24_gb(fast_cfg):
    torch.cuda.reset_peak_memory_stats()
    train(fast_cfg("model=sd14-random", "model.resolution=512", "model.dtype=bf16", "trainer.mixed_precision=bf16",
                   "trainer.gradient_checkpointing=true", "trainer.steps=2", "method.ddim_steps=4",
                   "export.formats=[delta]", "trainer.sample_steps=1"))
    assert torch.cuda.max_memory_allocated() < 24 * 2**30
