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
from stereo.attacks.inversion import InversionSettings, learn_token, templates_for
from stereo.attacks.learned_token import load_token, save_token
from stereo.evaluation.fid import reference_stats
from stereo.generation import encode_prompts
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


def test_encode_prompts_gives_what_the_pipeline_feeds_the_unet(pipe):
    prompts = ["a photo of a church", "", "a church " * 60]  # the last one is truncated to 77 tokens
    theirs, _ = pipe.encode_prompt(prompts, pipe.text_encoder.device, 1, False)
    assert torch.equal(encode_prompts(pipe, prompts), theirs)


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


DISAGREE = '''
"""Run by test_processes_agree_on_caches_and_errors with torchrun --nproc_per_node 2 (CPU/gloo)."""
import json, sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

dist.init_process_group("gloo", timeout=timedelta(seconds=90))  # the old code hung here: fail, not wait an hour
from accelerate import PartialState

from stereo.attacks import gallery as gallery_module, token as token_module
from stereo.attacks.base import AttackTarget, GenerationSettings, build_attack
from stereo.attacks.gallery import concept_gallery
from stereo.parallel import gather_or_raise, on_main
from stereo.evaluation.config import attack_config, compose_eval
from stereo.evaluation.fid import reference_stats
from stereo.evaluation.metrics import MetricSet
from stereo.models.tiny import tiny_pipeline
from tests.scripts.ddp_attacks import ATTACK, CONCEPT, GALLERY, MeanColour, reference_images

out = Path(sys.argv[1])
torch.set_num_threads(1)
state = PartialState(cpu=True)
rank = state.process_index
report = {}


def error_of(fn):
    try:
        fn()
    except Exception as error:
        return [type(error).__name__, str(error)]
    return None


def fail(on_rank):
    def fn():
        if rank == on_rank:
            raise FileNotFoundError(f"bad input on {on_rank}")
        return rank
    return fn


report["on_main"] = error_of(lambda: on_main(fail(0), state))
report["gather"] = error_of(lambda: gather_or_raise(fail(1), state))
report["shared"] = on_main(lambda: rank, state, share=True)
cfg = compose_eval(["concept=circle", f"metrics.clip_path={out / 'no-clip'}", f"output_dir={out / 'eval'}"])
report["clip"] = error_of(lambda: MetricSet.from_config(cfg, out, state))

# rank 1 sees the caches wrongly (NFS attribute caching): no gallery index or token spec, an FID cache file
is_file = Path.is_file
def stale(path):
    if path.name in ("index.json", "token.json"):
        return False
    return path.suffix == ".npz" or is_file(path)
if rank == 1:
    Path.is_file = stale

pipe = tiny_pipeline(seed=0)
pipe.set_progress_bar_config(disable=True)
asked, learned = [], []
generate, learn_token = gallery_module.generate, token_module.learn_token
gallery_module.generate = lambda pipe, prompts, seeds, **k: asked.extend(seeds) or generate(pipe, prompts, seeds, **k)
token_module.learn_token = lambda *a, **k: learned.append(1) or learn_token(*a, **k)
for run in ("first", "cached"):
    asked.clear()
    concept_gallery(pipe, cache_dir=out / "gallery", accelerator=state, **GALLERY)
    report[f"gallery_{run}"] = list(asked)
    learned.clear()
    target = AttackTarget(pipe, pipe, CONCEPT, out / "attack", out / "attack-gallery",
                          generation=GenerationSettings(2, 2), progress=False, accelerator=state)
    build_attack(attack_config("concept_inversion", **ATTACK)).prepare(target)
    report[f"token_{run}"] = len(learned)
extractor = MeanColour()
reference_stats(reference_images(out / f"reference{rank}"), extractor, out / "fid_cache", accelerator=state)
report["fid_seen"] = extractor.seen
(out / f"rank{rank}.json").write_text(json.dumps(report))
dist.barrier()
dist.destroy_process_group()  # a gloo group left to the interpreter's exit can abort the process
'''


def test_processes_agree_on_caches_and_errors(tmp_path):
    """Every process raises a user-input error met by one (a bad CLIP folder loads on the main process only),
    and the main process decides whether a cache is there: processes that disagree (NFS attribute caching,
    several nodes) would enter different numbers of collectives and hang. Here rank 1 sees the caches wrongly."""
    script = tmp_path / "disagree.py"
    script.write_text(DISAGREE)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["on_main"] for r in ranks] == [["FileNotFoundError", "bad input on 0"]] * 2
    assert [r["gather"] for r in ranks] == [["FileNotFoundError", "bad input on 1"]] * 2
    assert [r["shared"] for r in ranks] == [0, 0]
    assert [r["clip"][0] for r in ranks] == ["FileNotFoundError"] * 2 and "No CLIP model folder" in ranks[1]["clip"][1]
    assert [r["gallery_first"] for r in ranks] == [[0, 2, 4], [1, 3]]
    assert [r["gallery_cached"] for r in ranks] == [[], []]  # rank 1 follows rank 0: the index is there
    assert [r["token_first"] for r in ranks] == [1, 1] and [r["token_cached"] for r in ranks] == [0, 0]
    assert [r["fid_seen"] for r in ranks] == [4, 3]  # rank 1 follows rank 0: no cache yet, both extract
