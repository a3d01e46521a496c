"""STEREO on the tiny model: STE bookkeeping, resume after a killed round, REO from an STE folder."""

import json

import pytest
import torch

from stereo.attacks import inversion
from stereo.erasure.objectives import REOObjective, balanced_indices, reo_target
from stereo.recipes import train

TINY_STEREO = ["method=stereo", "method.ste.rounds=2", "method.ste.erase_steps=1", "method.ste.gallery_size=2",
               "method.ste.gallery_steps=2", "method.ste.inversion.steps=2", "method.ste.inversion.lr=0.05",
               "method.reo.steps=2", "method.reo.num_anchors=8", "concept=circle", "concepts.circle.prompts=[circle]"]


def test_reo_objective_batches_uncond_anchors_and_every_negative():
    g = torch.Generator().manual_seed(0)
    neg, unc = torch.randn(3, 77, 8, generator=g), torch.randn(77, 8, generator=g)
    anc = torch.randn(5, 77, 8, generator=g)
    obj = REOObjective(negatives=neg, uncond=unc, anchors=anc, eta_a=1.0, eta_n=3.0, anchors_per_step=2)
    cond = obj.sample(position=0, batch_size=2)
    torch.testing.assert_close(cond.student, neg[balanced_indices(3, 0, 2, seed=0)])
    emb = cond.teacher
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
    from stereo.generation import encode_prompts
    from stereo.models.tiny import tiny_pipeline

    fresh = tiny_pipeline(seed=0)
    fresh.load_textual_inversion(str(ste / "round_1" / "circle.safetensors"))
    assert torch.equal(fresh.text_encoder.get_input_embeddings().weight[-1], out["tokens"][1].learned.vectors[0])
    assert encode_prompts(fresh, ["a photo of a <circle-ste1>"]).shape == (1, 77, 64)


def test_ste_alone_exports_its_last_round_when_asked(fast_cfg, tmp_path):
    """method.stage=ste exports nothing unless method.ste.export_last: then the export is the last round's UNet
    (the saved round delta, not the first round's, not the base model's) and names what it erased."""
    from safetensors.torch import load_file

    out = train(fast_cfg(*TINY_STEREO, "method.stage=ste", "method.ste.export_last=true",
                         "method.ste.erase_lr=1e-2", "export.formats=[delta]"))
    ste = tmp_path / "run" / "ste"
    exported = load_file(out["export_dir"] / "delta.safetensors")
    last, first = (load_file(ste / f"round_{k}" / "unet_delta.safetensors") for k in (1, 0))
    assert exported.keys() == last.keys() and all(torch.equal(exported[k], last[k]) for k in last)
    assert any(not torch.equal(last[k], first[k]) for k in last)
    manifest = json.loads((out["export_dir"] / "manifest.json").read_text())
    assert manifest["stage"] == "ste" and manifest["erased"] == ["circle", "a photo of a <circle-ste0>"]
    assert manifest["adversarial_tokens"] == ["<circle-ste0>"]


class Killed(Exception):
    pass


@pytest.mark.parametrize("precision", ["no", "bf16"])  # bf16: each round's student must be prepared (autocast)
def test_ste_resumes_after_a_killed_round(fast_cfg, tmp_path, monkeypatch, precision):
    run = (*TINY_STEREO, "method.stage=ste", f"trainer.mixed_precision={precision}")
    straight = train(fast_cfg(*run, f"output_dir={tmp_path / 'a'}"))["tokens"]

    real, calls = inversion.learn_token, {"n": 0}

    def dies_in_round_1(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed
        return real(*args, **kwargs)
    import stereo.recipes.stereo as ste_module
    monkeypatch.setattr(ste_module, "learn_token", dies_in_round_1)
    with pytest.raises(Killed):
        train(fast_cfg(*run, f"output_dir={tmp_path / 'b'}"))
    assert (tmp_path / "b" / "ste" / "round_0" / "done.json").is_file()
    assert not (tmp_path / "b" / "ste" / "round_1" / "done.json").exists()

    calls["n"] = 10  # from now on the attack works; count how often it runs
    resumed = train(fast_cfg(*run, f"output_dir={tmp_path / 'b'}"))["tokens"]
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


def test_ste_learns_several_distinct_tokens_per_round_and_resumes_them(fast_cfg, tmp_path):
    """method.ste.tokens_per_round=2: each round keeps two tokens for the concept, the second from a random start
    (different vectors); the next round erases all of them, REO gets them all, and a finished run reloads them."""
    run = (*TINY_STEREO, "method.ste.tokens_per_round=2")
    out = train(fast_cfg(*run))
    assert [t.learned.token for t in out["tokens"]] == ["<circle-ste0>", "<circle-ste0-1>", "<circle-ste1>",
                                                        "<circle-ste1-1>"]
    assert not torch.equal(out["tokens"][0].learned.vectors, out["tokens"][1].learned.vectors)
    done = json.loads((tmp_path / "run" / "ste" / "round_1" / "done.json").read_text())
    assert done["erased"] == ["a photo of a <circle-ste0>", "a photo of a <circle-ste0-1>"]
    assert len(out["negatives"]) == 5  # the concept + 4 tokens
    again = train(fast_cfg(*run, "method.stage=ste"))["tokens"]  # every round finished: all loaded, none learned
    for a, b in zip(out["tokens"], again):
        assert a.learned.token == b.learned.token and torch.equal(a.learned.vectors, b.learned.vectors)


def test_reo_steps_per_negative_scale_with_what_ste_found(fast_cfg):
    """method.reo.steps_per_negative=N: REO trains N steps per negative (the concept and every STE token)."""
    out = train(fast_cfg(*TINY_STEREO, "method.reo.steps_per_negative=2"))
    assert len(out["negatives"]) == 3 and len(out["losses"]) == 6


def test_reo_only_and_errors(fast_cfg, tmp_path):
    out = train(fast_cfg("method=reo", "concept=circle", "concepts.circle.prompts=[circle]", "method.reo.steps=1",
                         "method.reo.num_anchors=4"))
    assert out["negatives"] == ["circle"] and len(out["anchors"]) == 4
    with pytest.raises(ValueError, match="method.ste_dir"):
        train(fast_cfg("method=stereo", "method.stage=reo"))
    with pytest.raises(FileNotFoundError, match="no finished STE round"):
        train(fast_cfg("method=stereo", "method.stage=reo", f"method.ste_dir={tmp_path}"))


def test_stereo_checkpoints_only_reo_and_a_resumed_reo_equals_the_uninterrupted_one(fast_cfg, tmp_path, monkeypatch):
    """trainer.checkpoint_every below STE's erase steps: STE erases without checkpoints (a finished round is its
    checkpoint), REO checkpoints under <run>/checkpoints, and the accelerator holds one trainer's model at a time."""
    import stereo.recipes.stereo as ste_module
    from stereo.erasure.context import RunContext

    common = [*TINY_STEREO, "method.ste.erase_steps=3", "method.reo.steps=4", "trainer.checkpoint_every=2",
              "trainer.lr=1e-3", "method.reo.lr=1e-3", "export.formats=[delta]"]
    held, attack = [], ste_module._attack

    def counting_attack(ctx, *args, **kwargs):  # runs right after each round's erasure
        held.append((len(ctx.accelerator._models), len(ctx.accelerator._optimizers)))
        return attack(ctx, *args, **kwargs)
    monkeypatch.setattr(ste_module, "_attack", counting_attack)
    straight = train(fast_cfg(*common, f"output_dir={tmp_path / 'straight'}"))
    assert held == [(0, 0), (0, 0)]  # each round's trainer was closed: no student or AdamW state left behind
    monkeypatch.undo()

    def killed_at_reo_step_3(self, step, metrics):
        if "reo/loss" in metrics and step == 3:
            raise Killed
    monkeypatch.setattr(RunContext, "log", killed_at_reo_step_3)
    with pytest.raises(Killed):
        train(fast_cfg(*common, f"output_dir={tmp_path / 'resumed'}"))
    monkeypatch.undo()
    checkpoints = sorted((tmp_path / "resumed" / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step_0000002"]  # REO's only; STE wrote none
    assert not list(checkpoints[0].glob("*_1.*"))  # no second model or optimiser (an STE student) inside
    resumed = train(fast_cfg(*common, f"output_dir={tmp_path / 'resumed'}", "trainer.resume=true"))
    assert len(resumed["losses"]) == 2  # REO steps 3 and 4 only
    for name in straight["trainable"]:
        torch.testing.assert_close(resumed["unet"].get_parameter(name), straight["unet"].get_parameter(name),
                                   rtol=0, atol=0, msg=name)


def test_ste_rounds_on_the_sd14_rehearsal_in_bf16(sd14_rehearsal_dir, tmp_path, fresh_accelerate_state):
    """STE on SD 1.4's classes, PNDM scheduler and trainer=gpu settings with bf16 frozen parts: the round grid
    draws with the erased UNet in the pipeline's dtype (it once cast the prepared student and crashed)."""
    from tests.conftest import compose, rehearsal_overrides

    out = train(compose(rehearsal_overrides(sd14_rehearsal_dir) + [
        "method=stereo", "method.stage=ste", "concept=nudity", f"output_dir={tmp_path / 'run'}"]))
    for k in range(2):
        round_dir = tmp_path / "run" / "ste" / f"round_{k}"
        assert (round_dir / "grid.png").is_file() and (round_dir / "done.json").is_file()
    assert [t.learned.token for t in out["tokens"]] == ["<nudity-ste0>", "<nudity-ste1>"]


def test_ste_keeps_the_erased_unet_in_fp32_over_a_bf16_base(sd14_rehearsal_dir, tmp_path, fresh_accelerate_state):
    """One STE round moves weights by less than a bf16 step: the erased UNet that the round's attack and the
    next round start from keeps the student's fp32 weights (a bf16 copy would round part of the erasure away)."""
    from safetensors.torch import load_file

    from tests.conftest import compose, rehearsal_overrides

    train(compose(rehearsal_overrides(sd14_rehearsal_dir) + [
        "method=stereo", "method.stage=ste", "method.ste.rounds=1", "method.ste.erase_lr=1e-4", "concept=nudity",
        f"output_dir={tmp_path / 'run'}"]))
    delta = load_file(tmp_path / "run" / "ste" / "round_0" / "unet_delta.safetensors")
    assert {t.dtype for t in delta.values()} == {torch.float32}
    assert any(not torch.equal(t.to(torch.bfloat16).float(), t) for t in delta.values()), "erasure rounded to bf16"


def test_ste_attacks_the_model_it_just_erased(fast_cfg, tmp_path):
    """STE's defining step: each round's concept inversion runs against the UNet that round erased, not the
    base. Redo round 0's inversion by hand (same gallery, settings and seed) against base + the round's saved
    tensors: it reproduces STE's token exactly; against the base UNet it gives another token."""
    import copy

    from PIL import Image

    from stereo.attacks.gallery import encode_images
    from stereo.models.loading import load_pipeline, load_unet_weights

    cfg = fast_cfg(*TINY_STEREO, "method.stage=ste", "method.ste.rounds=1", "method.ste.erase_steps=3",
                   "method.ste.erase_lr=1e-2", "method.ste.inversion.steps=3")
    token = train(cfg)["tokens"][0].learned
    round_dir = tmp_path / "run" / "ste" / "round_0"
    gallery = sorted((tmp_path / "run" / "ste" / "gallery" / "circle").glob("*.png"))
    concept, inv = cfg.concepts.circle, cfg.method.ste.inversion
    settings = inversion.InversionSettings(
        steps=inv.steps, lr=inv.lr, batch_size=inv.batch_size, num_vectors=inv.num_vectors, method=inv.method,
        templates=inversion.templates_for(concept.kind, inv.templates or concept.inversion_templates), seed=0)

    def invert(erased: bool) -> torch.Tensor:
        pipe = load_pipeline(cfg.model)
        if erased:
            pipe.unet = copy.deepcopy(pipe.unet).float()
            load_unet_weights(pipe.unet, round_dir / "unet_delta.safetensors")
        latents = encode_images(pipe, [Image.open(p).convert("RGB") for p in gallery])
        return inversion.learn_token(pipe, latents, token.token, concept.initializer_token, settings,
                                     progress=False).vectors

    assert torch.equal(invert(erased=True), token.vectors)
    assert not torch.equal(invert(erased=False), token.vectors)


@pytest.mark.parametrize("erase_all_found", [True, False])
def test_later_rounds_erase_every_token_found_or_only_the_latest(fast_cfg, tmp_path, erase_all_found):
    """`method.ste.erase_all_found`: round k erases all tokens of rounds < k (ours) or only round k-1's (reference)."""
    train(fast_cfg(*TINY_STEREO, "method.stage=ste", "method.ste.rounds=3",
                   f"method.ste.erase_all_found={str(erase_all_found).lower()}"))
    erased = json.loads((tmp_path / "run" / "ste" / "round_2" / "done.json").read_text())["erased"]
    latest = ["a photo of a <circle-ste1>"]
    assert erased == (["a photo of a <circle-ste0>"] + latest if erase_all_found else latest)
