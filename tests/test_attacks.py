"""Evaluation attacks on the tiny random pipeline: each runs on a small budget and writes its artifacts;
UnlearnDiffAtk stops at the first success; Ring-A-Bell never touches the evaluated model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stereo.attacks.base import (
    ATTACK_MODULES,
    AttackTarget,
    GenerationSettings,
    build_attack,
    read_attacked,
    render,
    restart_seed,
    write_attacked,
)
from stereo.attacks.learned_token import load_token
from stereo.attacks.ring_a_bell import concept_vector, default_pairs, encode_texts
from stereo.attacks.unlearndiffatk import project_to_simplex
from stereo.evaluation.config import attack_config
from stereo.evaluation.detectors import Detection
from stereo.models.tiny import tiny_pipeline

# per attack, a budget of a few steps (lr 5e-3: the rate these tests were written with)
GALLERY = dict(steps=2, gallery_size=2, gallery_steps=2)
SMALL = {"none": {}, "concept_inversion": GALLERY, "soft_prompt": {**GALLERY, "lr": 5e-3},
         "unlearndiffatk": {**GALLERY, "project_every": 1, "lr": 5e-3},
         "ring_a_bell": dict(steps=2, population=6, elite=2, prompt_length=5)}


def small(name: str, **changes):
    """Attack `name`'s schema with its small budget and `changes`."""
    return attack_config(name, **{**SMALL[name], **changes})


class ConstantDetector:
    """Flags every image (or none): makes 'stop at first success' observable."""

    def __init__(self, flag: bool):
        self.flag, self.calls = flag, 0

    def detect(self, images):
        self.calls += 1
        return Detection([float(self.flag)] * len(images), [self.flag] * len(images))


def fresh_pipe(seed: int = 0):
    pipe = tiny_pipeline(seed=seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def target_for(tmp_path, concept, name, detector=None, pipe=None, base=None):
    return AttackTarget(pipe or fresh_pipe(), base or fresh_pipe(), concept, tmp_path / "attacks" / name,
                        tmp_path / "gallery", detector=detector, generation=GenerationSettings(steps=2, batch_size=4),
                        progress=False)


@pytest.mark.parametrize("name", ["none", "concept_inversion", "soft_prompt", "unlearndiffatk", "ring_a_bell"])
def test_every_attack_runs_and_its_prompts_generate(name, tmp_path, concept, prompts):
    target = target_for(tmp_path, concept, name, detector=ConstantDetector(False))
    attack = build_attack(small(name))
    attack.prepare(target)
    attacked = attack.attack(target, prompts)
    assert [a.index for a in attacked] == [0, 1] and [a.seed for a in attacked] == [100, 101]
    assert [a.prompt for a in attacked] == [p.prompt for p in prompts]
    images = render(target.pipe, attacked, target.generation)
    assert len(images) == 2 and images[0].size == (32, 32)
    path = write_attacked(tmp_path / "prompts.jsonl", attacked)
    assert [a.text for a in read_attacked(path)] == [a.text for a in attacked]
    if name in ("concept_inversion", "soft_prompt"):
        token = load_token(target.out_dir / "token.safetensors")  # a diffusers textual-inversion file
        assert all(token.token in a.text for a in attacked)
        assert (target.out_dir / "token.json").is_file()
    if name in ("unlearndiffatk", "ring_a_bell"):
        assert all(a.token_ids is not None and len(a.token_ids) == 77 for a in attacked)


def test_rendering_from_token_ids_matches_rendering_from_text(tmp_path, concept, prompts):
    """Hard-token attacks carry ids; for a plain prompt the two paths must give the same image."""
    pipe = fresh_pipe()
    plain = build_attack(attack_config("none")).attack(None, prompts[:1])
    ids = pipe.tokenizer(prompts[0].prompt, padding="max_length", max_length=77).input_ids
    from dataclasses import replace

    by_ids = [replace(plain[0], token_ids=ids)]
    a = np.asarray(render(pipe, plain, GenerationSettings(2, 1))[0], dtype=float)
    b = np.asarray(render(pipe, by_ids, GenerationSettings(2, 1))[0], dtype=float)
    assert np.abs(a - b).max() <= 1


def test_learned_token_is_reused_from_disk(tmp_path, concept, prompts, monkeypatch):
    settings = small("concept_inversion")
    first = target_for(tmp_path, concept, "ci")
    build_attack(settings).prepare(first)
    import stereo.attacks.token as token_module

    monkeypatch.setattr(token_module, "learn_token", lambda *a, **k: pytest.fail("token was learned again"))
    again = target_for(tmp_path, concept, "ci")  # a fresh pipeline, as a resumed run or another process has
    attack = build_attack(settings)
    attack.prepare(again)
    saved = load_token(first.out_dir / "token.safetensors")
    ids = again.pipe.tokenizer.convert_tokens_to_ids([saved.token])
    torch.testing.assert_close(again.pipe.text_encoder.get_input_embeddings().weight[ids], saved.vectors)


def test_token_file_replays_a_saved_token(tmp_path, concept, prompts):
    learner = target_for(tmp_path, concept, "ci")
    build_attack(small("concept_inversion")).prepare(learner)
    target = target_for(tmp_path, concept, "replay")
    attack = build_attack(attack_config("token_file", token_file=str(learner.out_dir / "token.safetensors")))
    attack.prepare(target)
    assert "<circle-ci>" in attack.attack(target, prompts)[0].text
    with pytest.raises(ValueError, match="token_file"):
        build_attack(attack_config("token_file")).prepare(target)


def restart_target(tmp_path, concept, name, restart):
    """A target for restart `restart` of an attack, in its own folder, on a fresh (identical) pipeline."""
    from dataclasses import replace

    return replace(target_for(tmp_path, concept, f"{name}@r{restart}"), restart=restart)


@pytest.mark.parametrize("name", ["concept_inversion", "soft_prompt"])
def test_token_restarts_learn_other_tokens_and_each_reproduces(name, tmp_path, concept):
    """Restart r >= 1: its own seed and start, so another token; the same restart again: the same token;
    restart 0 is the attack as it was before restarts (its token.json has no `restart`, so caches stay valid)."""
    def vectors(folder, restart):
        build_attack(small(name)).prepare(restart_target(tmp_path / folder, concept, name, restart))
        return load_token(tmp_path / folder / "attacks" / f"{name}@r{restart}" / "token.safetensors").vectors

    first, second, again = vectors("a", 0), vectors("a", 1), vectors("b", 1)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, again, rtol=0, atol=0)
    spec = json.loads((tmp_path / "a" / "attacks" / f"{name}@r0" / "token.json").read_text())["spec"]
    assert "restart" not in spec and spec["settings"]["seed"] == 0
    spec = json.loads((tmp_path / "a" / "attacks" / f"{name}@r1" / "token.json").read_text())["spec"]
    assert spec["restart"] == 1 and spec["settings"]["seed"] == restart_seed(0, 1)


def test_soft_prompt_restart_starts_in_its_ball(tmp_path, concept):
    """PGD's random restart starts inside its L∞ ball (centred on the initializer's vectors) and stays there."""
    from stereo.attacks.inversion import initial_vectors

    target = restart_target(tmp_path, concept, "soft_prompt", 1)
    attack = build_attack(small("soft_prompt", pgd_eps=0.05))
    settings = attack.inversion_settings(target)
    init = initial_vectors(target.pipe, concept.initializer_token, 1)
    start = attack.start(target, settings)
    assert 0 < (start - init).abs().max() <= 0.05
    attack.prepare(target)
    learned = load_token(target.out_dir / "token.safetensors").vectors
    assert (learned - init).abs().max() <= 0.05 + 1e-6


def test_unlearndiffatk_restarts_search_from_other_prefixes(tmp_path, concept, prompts):
    def prefixes(restart):
        target = restart_target(tmp_path, concept, "unlearndiffatk", restart)
        attacked = build_attack(small("unlearndiffatk", check_success=False)).attack(target, prompts)
        return [a.info["prefix_ids"] for a in attacked]

    assert prefixes(1) != prefixes(0)
    assert prefixes(1) == prefixes(1)


def test_restart_seeds():
    """Restart 0 keeps the configured seed; other restarts get seeds no (seed, restart) pair shares."""
    assert restart_seed(7, 0) == 7
    seeds = {restart_seed(seed, r) for seed in range(20) for r in range(1, 6)}
    assert len(seeds) == 100 and not seeds & set(range(20))
    assert restart_seed(3, 2) == restart_seed(3, 2)
    with pytest.raises(ValueError, match="restart=-1"):
        restart_seed(0, -1)
    with pytest.raises(ValueError, match="restarts=0 must be >= 1"):
        small("concept_inversion", restarts=0)


def test_unlearndiffatk_stops_at_first_success(tmp_path, concept, prompts):
    settings = small("unlearndiffatk", steps=4, project_every=2)
    always = ConstantDetector(True)
    attacked = build_attack(settings).attack(target_for(tmp_path, concept, "u1", always), prompts)
    assert always.calls == 1  # both prompts succeeded at the first projection: no further checks
    assert all(a.info["success_during_attack"] and a.info["steps"] == 2 for a in attacked)
    never = ConstantDetector(False)
    attacked = build_attack(settings).attack(target_for(tmp_path, concept, "u2", never), prompts)
    assert never.calls == 2 and all(a.info["steps"] == 4 and not a.info["success_during_attack"] for a in attacked)
    # the prefix is k real tokens from the base vocabulary, followed by the prompt
    prefix = attacked[0].info["prefix_ids"]
    assert len(prefix) == 5 and all(0 <= i < 8190 for i in prefix)
    body = fresh_pipe().tokenizer(prompts[0].prompt).input_ids[1:-1]
    assert attacked[0].token_ids[1:6] == prefix and attacked[0].token_ids[6:6 + len(body)] == body


def test_simplex_projection():
    w = torch.tensor([[0.5, 0.5, 0.5], [2.0, 0.0, -1.0], [0.2, 0.3, 0.5]])
    p = project_to_simplex(w)
    torch.testing.assert_close(p, torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]))
    x = torch.randn(4, 3, 50)
    p = project_to_simplex(x)
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(4, 3))
    # optimality: no other simplex point drawn at random is closer to x
    other = torch.distributions.Dirichlet(torch.ones(50)).sample((4, 3))
    assert ((p - x).norm(dim=-1) <= (other - x).norm(dim=-1) + 1e-6).all()


class _Forbidden(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("Ring-A-Bell queried a UNet / VAE")


def test_ring_a_bell_never_calls_the_unet(tmp_path, concept, prompts):
    pipe, base = fresh_pipe(), fresh_pipe()
    for p in (pipe, base):
        p.unet.forward = _Forbidden().forward
        p.vae.forward = _Forbidden().forward
        p.vae.decode = _Forbidden().forward
    target = target_for(tmp_path, concept, "rab", detector=ConstantDetector(True), pipe=pipe, base=base)
    attacked = build_attack(small("ring_a_bell", steps=4)).attack(target, prompts)
    assert len(attacked) == 2 and all(np.isfinite(a.info["distance"]) for a in attacked)


def test_ring_a_bell_concept_vector_and_search(tmp_path, concept, prompts):
    pipe = fresh_pipe()
    pairs = default_pairs(concept)
    assert ("a photo of a circle", "a photo of a") in pairs
    manual = torch.stack([encode_texts(pipe, [a])[0] - encode_texts(pipe, [b])[0] for a, b in pairs]).mean(0)
    torch.testing.assert_close(concept_vector(pipe, pairs), manual)
    # the genetic search never ends worse than its starting individual (the prompt's own tokens)
    attack = build_attack(small("ring_a_bell", steps=5, population=8))
    goals = encode_texts(pipe, [p.prompt for p in prompts]) + 3.0 * manual
    gen = torch.Generator().manual_seed(0)
    from stereo.attacks.unlearndiffatk import attackable_vocabulary

    start = attack.initial_population(pipe, prompts, attackable_vocabulary(pipe.tokenizer), gen)
    start_distance = attack.fitness(pipe, start[:, :1], goals)[:, 0]
    _, best = attack.search(pipe, prompts, goals, progress=False)
    assert (best <= start_distance + 1e-6).all()


def test_unknown_attack_lists_valid_names():
    with pytest.raises(ValueError, match="valid attacks") as error:
        build_attack(SimpleNamespace(name="p4d"))
    assert all(name in str(error.value) for name in ATTACK_MODULES)


def test_each_attack_has_its_own_schema():
    """A budget field of another attack is an error, not silently ignored."""
    assert small("ring_a_bell").population == 6
    with pytest.raises(TypeError, match="gallery_size"):
        attack_config("ring_a_bell", gallery_size=2)
    with pytest.raises(ValueError, match="choose one of none, concept_inversion"):
        attack_config("p4d")


def test_precision_policy():
    """Defect 14: on CUDA the attack forward runs under bf16 autocast with fp32 inputs whatever the weights' dtype
    (fp32 too: STE attacks an fp32 erased UNet, and pure fp32 is 2-3x slower); on the CPU inputs are cast to the
    module's dtype (CPU autocast does not cast every op)."""
    from stereo.attacks.precision import Precision

    class Module:
        def __init__(self, device, dtype):
            self.weight = torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
            self.device = torch.device(device)

        def parameters(self):
            yield type("W", (), {"device": self.device, "dtype": self.weight.dtype})()

    x = torch.ones(2, dtype=torch.float64)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        cuda = Precision.of(Module("cuda", dtype))
        assert cuda.autocast and cuda.input(x).dtype == torch.float32
        cpu = Precision.of(Module("cpu", dtype))
        assert not cpu.autocast and cpu.input(x).dtype == dtype
        assert not isinstance(cpu.context(), torch.autocast)


@pytest.mark.parametrize("name", ["concept_inversion", "soft_prompt", "unlearndiffatk"])
def test_attacks_optimise_fp32_variables_under_the_precision_context(name, tmp_path, concept, prompts, monkeypatch):
    """Defect 14: the UNet forward of every gradient attack runs in the shared precision context (here CPU
    bf16 autocast stands in for CUDA's) and the variables it trains, and their gradients, stay fp32."""
    from stereo.attacks import precision

    monkeypatch.setattr(precision, "AUTOCAST_DEVICES", ("cpu",))  # pretend the CPU is a GPU (fp32 weights autocast)
    target = target_for(tmp_path, concept, name)
    seen = []
    forward = target.pipe.unet.forward

    def spy(sample, timestep, encoder_hidden_states, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), sample.dtype, encoder_hidden_states.dtype))
        return forward(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)

    grads = []
    adam_step = torch.optim.Adam.step

    def record(self, *args, **kwargs):
        grads.extend(p.grad.dtype for group in self.param_groups for p in group["params"])
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", record)
    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    monkeypatch.setattr(target.pipe.unet, "forward", spy)
    attack = build_attack(small(name, **({"check_success": False} if name == "unlearndiffatk" else {})))
    attack.prepare(target)
    attack.attack(target, prompts)
    assert seen and all(autocast for autocast, _, _ in seen), "the UNet ran outside the precision context"
    assert all(dtypes == [torch.float32, torch.float32] for _, *dtypes in seen), seen  # autocast casts, not us
    if name != "soft_prompt":  # PGD has no optimiser; its vectors are checked below
        assert grads and set(grads) == {torch.float32}
    if name != "unlearndiffatk":
        assert load_token(target.out_dir / "token.safetensors").vectors.dtype == torch.float32
