"""Evaluation attacks on the other model families: SD 2.1 (v-prediction) and SDXL (two text towers, pooled text
and size conditioning). Each attack runs on the tiny family pipelines; an SDXL token is a diffusers SDXL
textual-inversion pair; the denoising losses use the model's own prediction target; SDXL UNet calls carry the
pooled text embedding and time ids of the very prompts they were encoded from."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from stereo.attacks.base import (
    AttackTarget,
    GenerationSettings,
    build_attack,
    condition_of_ids,
    render,
)
from stereo.attacks.inversion import InversionSettings, initial_vectors, learn_token
from stereo.attacks.learned_token import LearnedToken, install_token, load_token, save_token
from stereo.attacks.ring_a_bell import concept_vector, default_pairs, encode_texts
from stereo.attacks.unlearndiffatk import attackable_vocabulary
from stereo.conditioning import prompt_ids, split_pooled
from stereo.evaluation.config import attack_config
from stereo.evaluation.detectors import Detection
from stereo.generation import encode_prompts
from stereo.models.families import SDXL_D1, SDXL_D2, SDXL_D_POOL, tiny_sd2_pipeline, tiny_sdxl_pipeline

GALLERY = dict(steps=2, gallery_size=2, gallery_steps=2)
SMALL = {"concept_inversion": GALLERY, "soft_prompt": {**GALLERY, "lr": 5e-3},
         "unlearndiffatk": {**GALLERY, "project_every": 1, "lr": 5e-3},
         "ring_a_bell": dict(steps=2, population=6, elite=2, prompt_length=5)}
BUILDERS = {"sd21": lambda: tiny_sd2_pipeline(0, "v_prediction"), "sd21-base": lambda: tiny_sd2_pipeline(0, "epsilon"),
            "sdxl": lambda: tiny_sdxl_pipeline(0)}
SIZE = 64  # the family pipelines' image size (8x8 latents)


def family_pipe(family: str):
    pipe = BUILDERS[family]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


class NeverDetector:
    def detect(self, images):
        return Detection([0.0] * len(images), [False] * len(images))


def target_for(tmp_path, concept, family, name, pipe=None):
    return AttackTarget(pipe or family_pipe(family), family_pipe(family), concept, tmp_path / "attacks" / name,
                        tmp_path / "gallery", detector=NeverDetector(),
                        generation=GenerationSettings(steps=2, batch_size=4), progress=False)


@pytest.mark.parametrize("family", ["sd21", "sdxl"])
@pytest.mark.parametrize("name", ["concept_inversion", "soft_prompt", "unlearndiffatk", "ring_a_bell", "token_file"])
def test_every_attack_runs_on_the_family(family, name, tmp_path, concept, prompts):
    """Each attack (few steps) gives one attacked prompt per prompt, and its images generate."""
    target = target_for(tmp_path, concept, family, name)
    if name == "token_file":  # replay a token of this family's widths, written as the family's file
        vectors = initial_vectors(target.pipe, "shape", 2) + 0.1
        widths = (SDXL_D1, SDXL_D2) if family == "sdxl" else ()
        path = save_token(LearnedToken("<replayed>", vectors, widths=widths), tmp_path / "replayed.safetensors")
        settings = attack_config("token_file", token_file=str(path))
    else:
        settings = attack_config(name, **SMALL[name])
    attack = build_attack(settings)
    attack.prepare(target)
    attacked = attack.attack(target, prompts)
    assert [a.index for a in attacked] == [0, 1] and [a.prompt for a in attacked] == [p.prompt for p in prompts]
    images = render(target.pipe, attacked, target.generation)
    assert len(images) == 2 and images[0].size == (SIZE, SIZE)
    if name in ("unlearndiffatk", "ring_a_bell"):
        assert all(a.token_ids is not None and len(a.token_ids) == 77 for a in attacked)
    else:
        token = attacked[0].info["token"]
        assert all(token in a.text for a in attacked)
        assert all(token in tokenizer.get_vocab() for tokenizer in (target.pipe.tokenizer,
                                                                    getattr(target.pipe, "tokenizer_2", None)) if
                   tokenizer is not None)


def test_sdxl_token_file_loads_in_diffusers_with_the_same_conditions(tmp_path):
    """An SDXL token is learned in both towers and saved as {"clip_l": (n, d1), "clip_g": (n, d2)}; diffusers'
    StableDiffusionXLPipeline, loading it tower by tower as its documentation does, encodes the prompt exactly
    as the learning pipeline does (both towers' states and the pooled embedding)."""
    pipe = family_pipe("sdxl")
    before = [encoder.get_input_embeddings().weight.detach().clone() for encoder in (pipe.text_encoder,
                                                                                      pipe.text_encoder_2)]
    latents = torch.randn(2, 4, 8, 8)
    learned = learn_token(pipe, latents, "<adv>", "church", InversionSettings(steps=2, lr=5e-2, num_vectors=2),
                          progress=False)
    assert learned.vectors.shape == (2, SDXL_D1 + SDXL_D2) and learned.widths == (SDXL_D1, SDXL_D2)
    for encoder, table in zip((pipe.text_encoder, pipe.text_encoder_2), before):  # both towers' vectors moved
        new = encoder.get_input_embeddings().weight.detach()
        assert torch.equal(new[: len(table)], table) and new.shape[0] == len(table) + 2
    init = initial_vectors(family_pipe("sdxl"), "church", 2)
    for tower in (slice(0, SDXL_D1), slice(SDXL_D1, None)):  # both towers' slices trained
        assert not torch.allclose(learned.vectors[:, tower], init[:, tower])
    path = save_token(learned, tmp_path / "adv.safetensors")

    state = load_file(str(path))
    assert set(state) == {"clip_l", "clip_g"}
    assert state["clip_l"].shape == (2, SDXL_D1) and state["clip_g"].shape == (2, SDXL_D2)
    fresh = family_pipe("sdxl")
    fresh.load_textual_inversion(state["clip_l"], token="<adv>", text_encoder=fresh.text_encoder,
                                 tokenizer=fresh.tokenizer)
    fresh.load_textual_inversion(state["clip_g"], token="<adv>", text_encoder=fresh.text_encoder_2,
                                 tokenizer=fresh.tokenizer_2)
    prompt = "a photo of a <adv>"
    embeds, _, pooled, _ = fresh.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    ours_embeds, ours_pooled = split_pooled(encode_prompts(pipe, [prompt]), pipe)
    torch.testing.assert_close(ours_embeds, embeds)
    torch.testing.assert_close(ours_pooled, pooled)

    loaded = load_token(path)  # our reader: the name from the metadata, the towers' widths from the pair
    assert loaded.token == "<adv>" and loaded.widths == (SDXL_D1, SDXL_D2)
    torch.testing.assert_close(loaded.vectors, learned.vectors)
    again = family_pipe("sdxl")
    install_token(again, loaded)
    torch.testing.assert_close(encode_prompts(again, [prompt]), encode_prompts(pipe, [prompt]))


def test_a_token_of_another_family_is_refused():
    sd_token = LearnedToken("<sd>", torch.zeros(1, 32))  # one tower, SD 2.x's width
    with pytest.raises(ValueError, match="widths"):
        install_token(family_pipe("sdxl"), sd_token)
    with pytest.raises(ValueError, match="widths"):
        install_token(family_pipe("sd21"), LearnedToken("<xl>", torch.zeros(1, 96), widths=(SDXL_D1, SDXL_D2)))


# --- the prediction target -------------------------------------------------------------------------
def oracle(pipe, predicts: str):
    """A stand-in UNet forward that is exact on clean latents x0 = 0, where x_t = sqrt(1 - a_t) eps:
    it returns eps = x_t / sqrt(1 - a_t) or v = sqrt(a_t) eps = sqrt(a_t / (1 - a_t)) x_t. The loss of an attack
    that trains towards the model's own target is then 0 (up to rounding); towards another target it is not."""
    alphas = pipe.scheduler.alphas_cumprod

    def forward(sample, timestep, encoder_hidden_states, added_cond_kwargs=None, **kwargs):
        a = alphas[timestep.cpu()].view(-1, 1, 1, 1).to(sample)
        scale = (a / (1 - a)).sqrt() if predicts == "v_prediction" else 1 / (1 - a).sqrt()
        return SimpleNamespace(sample=scale * sample + 0 * encoder_hidden_states.sum())  # keeps the graph

    return forward


@pytest.mark.parametrize("family", ["sd21", "sd21-base", "sdxl"])
def test_denoising_losses_train_towards_the_models_prediction_type(family, tmp_path, concept, prompts):
    """Concept inversion's and UnlearnDiffAtk's loss is || f(x_t) - target ||^2 with target = v on SD 2.1 (v-pred),
    eps on SD 2.1-base and SDXL (whose Euler scheduler's add_noise is x0 + sigma eps: the UNet must still see
    sqrt(a) x0 + sqrt(1 - a) eps). A perfect predictor of the model's own target has zero loss."""
    own = family_pipe(family).scheduler.config.prediction_type
    other = "epsilon" if own == "v_prediction" else "v_prediction"
    zeros = torch.zeros(3, 4, 8, 8)
    losses = {}
    for predicts in (own, other):
        pipe = family_pipe(family)
        pipe.unet.forward = oracle(pipe, predicts)
        learned = learn_token(pipe, zeros, "<x>", "shape", InversionSettings(steps=1, lr=1e-3, batch_size=4),
                             progress=False)
        attack = build_attack(attack_config("unlearndiffatk", **SMALL["unlearndiffatk"]))
        tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
        vocab = attackable_vocabulary(*tokenizers)
        tables = [e.get_input_embeddings().weight.detach()[vocab].float()
                  for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
        weights = torch.nn.functional.one_hot(torch.arange(10).view(2, 5), len(vocab)).float()
        body = [pipe.tokenizer(p.prompt, add_special_tokens=False).input_ids for p in prompts]
        loss = attack._loss(pipe, weights, torch.arange(2), tables, body, zeros, torch.Generator().manual_seed(0))
        losses[predicts] = (learned.losses[0], float(loss))
    assert max(losses[own]) < 1e-8, losses
    assert min(losses[other]) > 1e-4, losses


# --- SDXL's added conditions -------------------------------------------------------------------------
def spy_added_conditions(pipe):
    calls = []
    forward = pipe.unet.forward

    def spy(sample, timestep, encoder_hidden_states, added_cond_kwargs=None, **kwargs):
        calls.append((encoder_hidden_states.detach().clone(), added_cond_kwargs and
                      {k: v.detach().clone() for k, v in added_cond_kwargs.items()}))
        return forward(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                       added_cond_kwargs=added_cond_kwargs, **kwargs)

    pipe.unet.forward = spy
    return calls


def test_sdxl_attack_unet_calls_carry_the_prompts_pooled_embedding_and_time_ids(tmp_path, concept, prompts):
    """Every SDXL UNet call of an attack gets `text_embeds` = the pooled embedding of the prompt it encoded (not
    zeros, not another prompt's) and `time_ids` = (64, 64, 0, 0, 64, 64) for 8x8 latents."""
    expected_time = torch.tensor([SIZE, SIZE, 0, 0, SIZE, SIZE], dtype=torch.float32)
    # concept inversion: step 0 runs at the initializer's vectors, so each row's pooled embedding is that of
    # one inversion template filled with the token as it starts
    target = target_for(tmp_path, concept, "sdxl", "ci")
    calls = spy_added_conditions(target.pipe)
    attack = build_attack(attack_config("concept_inversion", **{**GALLERY, "batch_size": 2}))
    attack.prepare(target)
    assert len(calls) == 2
    for _, added in calls:
        assert added is not None and added["text_embeds"].shape == (2, SDXL_D_POOL)
        assert torch.equal(added["time_ids"], expected_time.expand(2, -1))
    start = family_pipe("sdxl")
    install_token(start, LearnedToken(attack.token, initial_vectors(start, concept.initializer_token, 1),
                                      widths=(SDXL_D1, SDXL_D2)))
    candidates = split_pooled(encode_prompts(start, [t.format(attack.token) for t in attack.templates(target)]),
                              start)[1]  # (T, d_pool)
    first = calls[0][1]["text_embeds"]
    distance = torch.cdist(first, candidates).min(dim=1).values
    assert (distance < 1e-4).all() and first.abs().max() > 0, distance

    # UnlearnDiffAtk: after one small step the hard prefix is still the start tokens, so the first call's
    # pooled embeddings are those of the attacked prompts' token ids, prompt by prompt
    target = target_for(tmp_path, concept, "sdxl", "udatk")
    calls = spy_added_conditions(target.pipe)
    attacked = build_attack(attack_config("unlearndiffatk", **{**SMALL["unlearndiffatk"], "steps": 1,
                                                               "check_success": False})).attack(target, prompts)
    assert len(calls) == 1 and torch.equal(calls[0][1]["time_ids"], expected_time.expand(2, -1))
    cond = condition_of_ids(target.pipe, torch.tensor([a.token_ids for a in attacked]))
    torch.testing.assert_close(calls[0][1]["text_embeds"], split_pooled(cond, target.pipe)[1])
    torch.testing.assert_close(calls[0][0], cond[:, :77])


def test_sdxl_hard_tokens_read_the_same_ids_in_both_towers(concept, prompts):
    """Hard-token prompts (UnlearnDiffAtk, Ring-A-Bell) carry the first tokenizer's ids; tower 2 reads the same
    tokens with its own padding, so the condition of a prompt's ids is the condition of its text. Ring-A-Bell
    searches in that packed condition (states and pooled row): a prompt's own tokens are at distance 0 from it."""
    pipe = family_pipe("sdxl")
    texts = [p.prompt for p in prompts]
    torch.testing.assert_close(condition_of_ids(pipe, prompt_ids(pipe.tokenizer, texts)), encode_prompts(pipe, texts))
    vocab = attackable_vocabulary(pipe.tokenizer, pipe.tokenizer_2)
    assert 0 not in vocab.tolist()  # "!" pads tower 2: never a prefix token

    vector = concept_vector(pipe, default_pairs(concept))
    assert vector.shape == (78, SDXL_D1 + SDXL_D2) and vector[77, :SDXL_D_POOL].abs().max() > 0
    attack = build_attack(attack_config("ring_a_bell", **SMALL["ring_a_bell"]))
    for text in texts:
        own = torch.tensor(pipe.tokenizer(text, add_special_tokens=False).input_ids)  # (L,)
        distance = attack.fitness(pipe, own[None, None], encode_texts(pipe, [text]))  # (1, 1)
        assert distance.abs().max() < 1e-10, distance


def test_ste_tokens_of_an_sdxl_run_load_into_both_towers(tmp_path):
    """STE's round files on SDXL are diffusers' SDXL pairs; `load_ste_tokens` puts them in both towers."""
    from stereo.recipes.ste_rounds import DONE, load_ste_tokens

    pipe = family_pipe("sdxl")
    learned = LearnedToken("<circle-adv>", torch.randn(1, SDXL_D1 + SDXL_D2), widths=(SDXL_D1, SDXL_D2))
    round_dir = tmp_path / "ste" / "round_0"
    save_token(learned, round_dir / "circle.safetensors")
    (round_dir / DONE).write_text(json.dumps({"round": 0, "tokens": [
        {"concept": "circle", "token": learned.token, "prompt": "a photo of a <circle-adv>",
         "file": "circle.safetensors"}]}))
    assert set(load_file(str(round_dir / "circle.safetensors"))) == {"clip_l", "clip_g"}
    (token,) = load_ste_tokens(pipe, tmp_path)
    assert token.learned.token == "<circle-adv>"
    for encoder, tokenizer, piece in ((pipe.text_encoder, pipe.tokenizer, learned.vectors[:, :SDXL_D1]),
                                      (pipe.text_encoder_2, pipe.tokenizer_2, learned.vectors[:, SDXL_D1:])):
        row = tokenizer.convert_tokens_to_ids(["<circle-adv>"])
        torch.testing.assert_close(encoder.get_input_embeddings().weight[row].detach(), piece)


@pytest.mark.parametrize("name", ["concept_inversion", "unlearndiffatk"])
def test_sdxl_attacks_keep_the_precision_rule(name, tmp_path, concept, prompts, monkeypatch):
    """As on SD (test_attacks): the SDXL UNet forward runs in the precision context (CPU bf16 autocast standing in
    for CUDA's) with fp32 inputs, the pooled text embedding and time ids included; the token trains in fp32."""
    from stereo.attacks import precision

    monkeypatch.setattr(precision, "AUTOCAST_DEVICES", ("cpu",))
    target = target_for(tmp_path, concept, "sdxl", name)
    seen = []
    forward = target.pipe.unet.forward

    def spy(sample, timestep, encoder_hidden_states, added_cond_kwargs=None, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), sample.dtype, encoder_hidden_states.dtype,
                     *(v.dtype for v in added_cond_kwargs.values())))
        return forward(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                       added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(target.pipe.unet, "forward", spy)
    attack = build_attack(attack_config(name, **{**SMALL[name], **({"check_success": False}
                                                                   if name == "unlearndiffatk" else {})}))
    attack.prepare(target)
    attack.attack(target, prompts)
    assert seen and all(autocast for autocast, *_ in seen), "the UNet ran outside the precision context"
    assert all(set(dtypes) == {torch.float32} for _, *dtypes in seen), seen
    if name == "concept_inversion":
        assert load_token(target.out_dir / "token.safetensors").vectors.dtype == torch.float32
