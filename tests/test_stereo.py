"""STEREO on the tiny model: STE bookkeeping, resume after a killed round, REO from an STE folder."""

import json

import pytest
import torch

from stereo.attacks import inversion
from stereo.erasure.trainer import REOObjective
from stereo.objectives import reo_target
from stereo.train import train

TINY_STEREO = ["method=stereo", "method.ste.rounds=2", "method.ste.erase_steps=1", "method.ste.gallery_size=2",
               "method.ste.gallery_steps=2", "method.ste.inversion.steps=2", "method.ste.inversion.lr=0.05",
               "method.reo.steps=2", "method.reo.num_anchors=8", "concept=circle", "concepts.circle.prompts=[circle]"]


def test_reo_objective_batches_uncond_anchors_and_every_negative():
    g = torch.Generator().manual_seed(0)
    neg, unc = torch.randn(3, 77, 8, generator=g), torch.randn(77, 8, generator=g)
    anc = torch.randn(5, 77, 8, generator=g)
    obj = REOObjective(negatives=neg, uncond=unc, anchors=anc, eta_a=1.0, eta_n=3.0, anchors_per_step=2)
    emb = obj.teacher_embeddings(torch.tensor([0, 2]), draw=0, seed=0)
    assert emb.shape == (1 + 2 + 3, 2, 77, 8)
    assert torch.equal(emb[0, 1], unc) and torch.equal(emb[3:, 0], neg) and torch.equal(emb[3:, 1], neg)
    used = {int(i) for a in range(1, 3) for b in range(2) for i in range(5) if torch.equal(emb[a, b], anc[i])}
    assert len(used) == 4  # four distinct anchors: balanced draws without repeats within a cycle
    eps = torch.randn(6, 2, 4, 4, 4, generator=g)
    torch.testing.assert_close(obj.target(eps), reo_target(eps[0], eps[1:3], eps[3:], 1.0, 3.0))


def test_stereo_end_to_end_writes_rounds_tokens_and_export(fast_cfg, tmp_path):
    out = train(fast_cfg(*TINY_STEREO))
    ste = tmp_path / "run" / "ste"
    for k in range(2):
        done = json.loads((ste / f"round_{k}" / "done.json").read_text())
        assert done["tokens"][0]["token"] == f"<circle-ste{k}>"
        assert (ste / f"round_{k}" / "grid.png").is_file()
        assert (ste / f"round_{k}" / "unet_delta.safetensors").is_file()
    assert json.loads((ste / "round_1" / "done.json").read_text())["erased"] == ["a photo of a <circle-ste0>"]
    assert [t["token"] for t in json.loads((ste / "tokens.json").read_text())] == ["<circle-ste0>", "<circle-ste1>"]
    manifest = json.loads((out["export_dir"] / "manifest.json").read_text())
    assert manifest["adversarial_tokens"] == ["<circle-ste0>", "<circle-ste1>"]
    assert manifest["erased"] == ["circle", "a photo of a <circle-ste0>", "a photo of a <circle-ste1>"]
    assert manifest["anchors"] == 8
    # the token files load in diffusers and give the embedding STE used
    from stereo.attacks.inversion import encode_prompts
    from stereo.models.tiny import tiny_pipeline

    fresh = tiny_pipeline(seed=0)
    fresh.load_textual_inversion(str(ste / "round_1" / "circle.safetensors"))
    assert torch.equal(fresh.text_encoder.get_input_embeddings().weight[-1], out["tokens"][1].learned.vectors[0])
    assert encode_prompts(fresh, ["a photo of a <circle-ste1>"]).shape == (1, 77, 64)


class Killed(Exception):
    pass


def test_ste_resumes_after_a_killed_round(fast_cfg, tmp_path, monkeypatch):
    straight = train(fast_cfg(*TINY_STEREO, "method.stage=ste", f"output_dir={tmp_path / 'a'}"))["tokens"]

    real, calls = inversion.learn_token, {"n": 0}

    def dies_in_round_1(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed
        return real(*args, **kwargs)
    import stereo.ste as ste_module
    monkeypatch.setattr(ste_module, "learn_token", dies_in_round_1)
    with pytest.raises(Killed):
        train(fast_cfg(*TINY_STEREO, "method.stage=ste", f"output_dir={tmp_path / 'b'}"))
    assert (tmp_path / "b" / "ste" / "round_0" / "done.json").is_file()
    assert not (tmp_path / "b" / "ste" / "round_1" / "done.json").exists()

    calls["n"] = 10  # from now on the attack works; count how often it runs
    resumed = train(fast_cfg(*TINY_STEREO, "method.stage=ste", f"output_dir={tmp_path / 'b'}"))["tokens"]
    assert calls["n"] == 11  # only round 1 was attacked again
    for a, b in zip(straight, resumed):
        assert a.learned.token == b.learned.token
        torch.testing.assert_close(a.learned.vectors, b.learned.vectors)


def test_reo_stage_from_a_finished_ste_folder(fast_cfg, tmp_path):
    train(fast_cfg(*TINY_STEREO, "method.stage=ste", f"output_dir={tmp_path / 'ste'}"))
    out = train(fast_cfg(*TINY_STEREO, "method.stage=reo", f"method.ste_dir={tmp_path / 'ste'}",
                         "method.reo.adversarial=last", f"output_dir={tmp_path / 'reo'}"))
    assert out["negatives"] == ["circle", "a photo of a <circle-ste1>"]
    assert not (tmp_path / "reo" / "ste").exists()


def test_reo_only_and_errors(fast_cfg, tmp_path):
    out = train(fast_cfg("method=reo", "concept=circle", "concepts.circle.prompts=[circle]", "method.reo.steps=1",
                         "method.reo.num_anchors=4"))
    assert out["negatives"] == ["circle"] and len(out["anchors"]) == 4
    with pytest.raises(ValueError, match="method.ste_dir"):
        train(fast_cfg("method=stereo", "method.stage=reo"))
    with pytest.raises(FileNotFoundError, match="no finished STE round"):
        train(fast_cfg("method=stereo", "method.stage=reo", f"method.ste_dir={tmp_path}"))
