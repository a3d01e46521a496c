"""Concept inversion: only the new token trains; its file loads with diffusers' load_textual_inversion."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from stereo.attacks.gallery import concept_gallery, encode_images
from stereo.attacks.inversion import (
    InversionSettings,
    encode_prompts,
    learn_token,
    load_token,
    save_token,
    templates_for,
)
from stereo.evaluation.fid import reference_stats
from stereo.models.tiny import tiny_pipeline
from tests.conftest import ROOT
from tests.scripts.ddp_attacks import GALLERY, MeanColour, pixels_hash


@pytest.fixture
def pipe():
    p = tiny_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def latents(pipe, tmp_path):
    images = concept_gallery(pipe, ["a photo of a church"], n=3, cache_dir=tmp_path / "gallery", steps=2)
    return encode_images(pipe, images)


def test_only_the_new_token_rows_train(pipe, latents):
    table_before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items() if "token_embedding" not in k}
    learned = learn_token(pipe, latents, "<church-adv>", "church",
                          InversionSettings(steps=3, lr=5e-2, num_vectors=2), progress=False)
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert table.shape[0] == table_before.shape[0] + 2
    assert torch.equal(table[: table_before.shape[0]], table_before)  # every old row bit-identical
    assert torch.equal(table[-2:], learned.vectors)
    init = table_before[pipe.tokenizer("church", add_special_tokens=False).input_ids].mean(0)
    assert not torch.allclose(learned.vectors[0], init), "the new vectors did not move"
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in unet_before.items())
    assert all(torch.equal(v, pipe.text_encoder.state_dict()[k]) for k, v in text_before.items())
    assert len(learned.losses) == 3


def test_exported_token_loads_in_diffusers_with_the_same_text_embedding(pipe, latents, tmp_path):
    learned = learn_token(pipe, latents, "<adv>", "church", InversionSettings(steps=2, lr=5e-2, num_vectors=2),
                          progress=False)
    path = save_token(learned, tmp_path / "adv.safetensors")
    ours = encode_prompts(pipe, ["a photo of a <adv>"])
    fresh = tiny_pipeline(seed=0)
    fresh.load_textual_inversion(str(path))
    theirs = encode_prompts(fresh, ["a photo of a <adv>"])
    torch.testing.assert_close(ours, theirs)
    assert load_token(path).vectors.shape == (2, 64)


def test_pgd_stays_in_its_ball(pipe, latents):
    settings = InversionSettings(steps=4, lr=0.05, method="pgd", pgd_eps=0.02)
    init = pipe.text_encoder.get_input_embeddings().weight[
        pipe.tokenizer("church", add_special_tokens=False).input_ids].detach().mean(0)
    learned = learn_token(pipe, latents, "<pgd>", "church", settings, progress=False)
    assert (learned.vectors[0] - init).abs().max() <= 0.02 + 1e-6


def test_unknown_method_and_kind():
    with pytest.raises(ValueError, match="ti, pgd"):
        learn_token(None, None, "<x>", "a", InversionSettings(method="adam"))
    with pytest.raises(ValueError, match="object, style, nudity"):
        templates_for("sound")


def test_gallery_is_cached_and_regenerated_when_the_request_changes(pipe, tmp_path):
    a = concept_gallery(pipe, ["a church"], n=2, cache_dir=tmp_path / "g", steps=2)
    stamp = (tmp_path / "g" / "00000.png").stat().st_mtime_ns
    b = concept_gallery(pipe, ["a church"], n=2, cache_dir=tmp_path / "g", steps=2)
    assert (tmp_path / "g" / "00000.png").stat().st_mtime_ns == stamp
    assert [list(x.getdata()) for x in a] == [list(x.getdata()) for x in b]
    concept_gallery(pipe, ["a church"], n=2, cache_dir=tmp_path / "g", steps=3)
    assert (tmp_path / "g" / "00000.png").stat().st_mtime_ns != stamp


def test_two_processes_share_the_gallery_and_the_inversion(tmp_path, pipe):
    """Defects 9, 10, 12, 13: rank r generates gallery images i = r (mod 2) and the inversion is data-parallel
    (own batches per rank, gradients averaged), so both ranks end with the same gallery and vectors; the
    evaluation attacks' prepare and the FID reference features are split the same way."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}  # the script imports this tree's stereo, not whichever is installed
    with socket.socket() as probe:  # a free port: a fixed one may be taken by another test run
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(ROOT / "tests" / "scripts" / "ddp_attacks.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert [r["asked"] for r in ranks] == [[0, 2, 4], [1, 3]]  # no image generated twice
    alone = concept_gallery(pipe, cache_dir=tmp_path / "alone", **GALLERY)
    assert ranks[0]["gallery"] == ranks[1]["gallery"] == pixels_hash(alone)
    assert json.loads((tmp_path / "gallery" / "index.json").read_text())["items"][4]["seed"] == 4
    assert ranks[0]["vectors"] == ranks[1]["vectors"] and ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["vectors"] != ranks[0]["alone"], "rank 1's batches did not count in the update"
    # evaluation (defects 12, 13): the token attack's gallery and inversion, UnlearnDiffAtk's gallery and the
    # FID reference features are split between the processes, and every process ends with the whole result
    for name in ("concept_inversion", "unlearndiffatk"):
        assert [r[name]["asked"] for r in ranks] == [[0, 2], [1]]
    learned = [(r["concept_inversion"]["token"], r["concept_inversion"]["vectors"]) for r in ranks]
    assert learned[0] == learned[1]  # the same token in both pipelines
    assert load_token(tmp_path / "attacks" / "concept_inversion" / "token.safetensors").vectors.tolist() == \
        ranks[0]["concept_inversion"]["vectors"]
    assert [r["fid"]["seen"] for r in ranks] == [4, 3]
    alone = reference_stats(sorted((tmp_path / "reference0").glob("*.png")), MeanColour())
    for rank in ranks:
        np.testing.assert_allclose(rank["fid"]["mean"], alone.mean, rtol=1e-12)
        np.testing.assert_allclose(rank["fid"]["cov"], alone.cov, rtol=1e-12)
