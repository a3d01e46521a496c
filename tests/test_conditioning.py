"""Every family's conditioning and prediction type (stereo.conditioning): SD 2.x's v-prediction in the denoising
target and the x_t chain; SDXL's two text towers, packed pooled row and size conditioning in every UNet call
(the trainer's student and teacher, the sampler, generation)."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler, EulerDiscreteScheduler

from stereo import conditioning
from stereo.erasure.objectives import ESDObjective, Preservation
from stereo.erasure.sampling import ddim_scheduler, sample_xt
from stereo.erasure.subsets import select_trainable
from stereo.erasure.trainer import ErasureTrainer, TrainerSettings
from stereo.generation import encode_prompts, generate, swap_unet
from stereo.models.families import tiny_sd2_pipeline, tiny_sdxl_pipeline

PROMPTS = ["a church", "a parachute", ""]


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl_pipeline(seed=0)


@pytest.fixture(scope="module")
def sd2v():
    return tiny_sd2_pipeline(seed=0, prediction_type="v_prediction")


def noisy(seed: int = 0, batch: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=gen), torch.randn(batch, 4, 8, 8, generator=gen)


# -- (a) the denoising target follows the prediction type -------------------------------------------------
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_denoising_target_is_the_prediction_types_formula(kind):
    scheduler = DDPMScheduler(prediction_type=kind, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    latents, noise = noisy()
    t = torch.tensor([0, 420, 999])
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = {"epsilon": noise, "sample": latents,
                "v_prediction": alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents}[kind]
    torch.testing.assert_close(conditioning.denoising_target(scheduler, latents, noise, t), expected)


def test_v_target_needs_no_get_velocity_and_unknown_types_are_named():
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(prediction_type="v_prediction")  # PNDM has no get_velocity
    latents, noise = noisy()
    t = torch.tensor([5, 500, 900])
    reference = DDPMScheduler(prediction_type="v_prediction").get_velocity(latents, noise, t)
    torch.testing.assert_close(conditioning.denoising_target(scheduler, latents, noise, t), reference)
    scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="'flow'.*v_prediction"):
        conditioning.denoising_target(scheduler, latents, noise, t)


# -- (b) SDXL conditions ----------------------------------------------------------------------------------
def test_sdxl_condition_is_both_towers_penultimate_states_and_the_packed_pooled_row(sdxl):
    cond = encode_prompts(sdxl, PROMPTS)
    d1, d2 = sdxl.text_encoder.config.hidden_size, sdxl.text_encoder_2.config.hidden_size
    d_pool = conditioning.pooled_dim(sdxl)
    assert conditioning.is_sdxl(sdxl) and cond.shape == (3, 78, d1 + d2)
    with torch.no_grad():
        embeds, _, pooled, _ = sdxl.encode_prompt(PROMPTS[:2], do_classifier_free_guidance=False)
        ids = sdxl.tokenizer_2(PROMPTS[:2], padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
        text_embeds = sdxl.text_encoder_2(ids).text_embeds
    torch.testing.assert_close(cond[:2, :77], embeds)  # what the SDXL pipeline feeds its UNet
    torch.testing.assert_close(cond[:2, 77, :d_pool], text_embeds)
    torch.testing.assert_close(cond[:2, 77, :d_pool], pooled)
    assert not cond[:2, 77, d_pool:].any()  # zeros after the pooled embedding
    assert not cond[2].any()  # "" is SDXL's zero unconditional (force_zeros_for_empty_prompt)
    prompt_embeds, pooled_embeds = conditioning.split_pooled(cond, sdxl)
    assert prompt_embeds.shape == (3, 77, d1 + d2) and pooled_embeds.shape == (3, d_pool)


def test_empty_prompt_is_encoded_when_zeros_are_not_forced(sdxl):
    pipe = copy.copy(sdxl)  # the same modules, a config of its own
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    assert encode_prompts(pipe, [""]).abs().sum() > 0
    assert not encode_prompts(sdxl, [""]).any()


def test_sdxl_multi_vector_tokens_expand_in_both_towers():
    pipe = tiny_sdxl_pipeline(seed=0)  # its own: tokens are added to it
    for tokenizer, encoder in conditioning.text_towers(pipe):
        tokenizer.add_tokens(["<x>", "<x>_1"])
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    expanded = [conditioning.prompt_ids(tokenizer, ["a <x> <x>_1"]) for tokenizer, _ in conditioning.text_towers(pipe)]
    with torch.no_grad():
        assert torch.equal(encode_prompts(pipe, ["a <x>"]), conditioning.encode_tokens(pipe, expanded))


def test_sd_conditions_are_unchanged(sd2v):
    cond = encode_prompts(sd2v, PROMPTS)
    ids = sd2v.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert not conditioning.is_sdxl(sd2v) and cond.shape == (3, 77, sd2v.text_encoder.config.hidden_size)
    assert torch.equal(cond, sd2v.text_encoder(ids)[0])
    x, _ = noisy()
    assert conditioning.unet_inputs(sd2v.unet, cond, x).keys() == {"encoder_hidden_states"}


def test_predict_is_the_pipelines_unet_call_and_reads_the_pooled_row(sdxl):
    cond = encode_prompts(sdxl, PROMPTS[:2]).detach()
    x, _ = noisy(batch=2)
    t = torch.tensor([300, 700])
    time_ids = sdxl._get_add_time_ids((64, 64), (0, 0), (64, 64), cond.dtype,
                                      text_encoder_projection_dim=sdxl.text_encoder_2.config.projection_dim)
    embeds, pooled = conditioning.split_pooled(cond, sdxl)
    with torch.no_grad():
        direct = sdxl.unet(x, t, encoder_hidden_states=embeds,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(2, 1)}).sample
        ours = conditioning.predict(sdxl.unet, x, t, cond)
        other_pooled = cond.clone()
        other_pooled[:, 77] = cond[[1, 0], 77]  # each prompt with the other's pooled embedding
        swapped = conditioning.predict(sdxl.unet, x, t, other_pooled)
    torch.testing.assert_close(ours, direct)
    assert (swapped - ours).abs().amax() > 1e-4


# -- (c) one erasure step on each new family ---------------------------------------------------------------
@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("family", ["sdxl", "sd2v"])
def test_one_esd_step_trains_the_subset(family, accelerator, request):
    pipe = request.getfixturevalue(family)
    negatives, uncond = encode_prompts(pipe, PROMPTS[:2]).detach(), encode_prompts(pipe, [""])[0].detach()
    kept = encode_prompts(pipe, ["a tree", "a house"]).detach()  # 2 per latent on their own chains: the widest batch
    objective = ESDObjective(negatives=negatives, uncond=uncond,
                             preserve=Preservation(kept, 0.5, latents="own", per_latent=2))
    student = copy.deepcopy(pipe.unet).float()
    names = select_trainable(student, "xattn")
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    settings = TrainerSettings(steps=1, lr=1e-3, ddim_steps=3, latent_size=8)
    with ErasureTrainer(accelerator, student, pipe.unet, pipe.scheduler, objective, settings) as trainer:
        result = trainer.run()
    after = dict(trainer.student.named_parameters())
    assert len(result.losses) == 1 and torch.isfinite(torch.tensor(result.losses)).all()
    assert any(not torch.equal(before[n], after[n]) for n in names)
    assert all(torch.equal(before[n], after[n]) for n in before if n not in names)


def test_sdxl_preview_generation_from_conditions_matches_the_pipelines_own_encoding(sdxl):
    student = copy.deepcopy(sdxl.unet).requires_grad_(True)  # a student being trained: swapped in as a frozen copy
    with swap_unet(sdxl, student) as pipe:
        from_prompts = generate(pipe, PROMPTS[:2], [0, 1], steps=2, height=64, width=64)
        from_embeds = generate(pipe, None, [0, 1], prompt_embeds=encode_prompts(pipe, PROMPTS[:2]), steps=2,
                               height=64, width=64)
    assert sdxl.unet is not student
    for a, b in zip(from_prompts, from_embeds):
        assert (torch.tensor(list(a.getdata())).float() - torch.tensor(list(b.getdata())).float()).abs().max() <= 1


# -- (d) the x_t chain reads the model's prediction type and SDXL's schedule ---------------------------------
def test_xt_chain_converts_v_predictions(sd2v):
    unet, scheduler = sd2v.unet, sd2v.scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    cond, uncond = encode_prompts(sd2v, PROMPTS[:2]).detach(), encode_prompts(sd2v, [""])[0].detach()
    steps, guidance, stop = 5, 3.0, 3
    x_t, t = sample_xt(unet, scheduler, cond, uncond, torch.tensor([stop, stop]), num_steps=steps,
                       guidance=guidance, latent_shape=(4, 8, 8), generator=torch.Generator().manual_seed(0))

    def manual_chain(as_v: bool) -> torch.Tensor:  # DDIM (eta 0) written out
        ddim = ddim_scheduler(scheduler)
        ddim.set_timesteps(steps)
        alphas = scheduler.alphas_cumprod
        x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
        for k in range(stop):
            step = int(ddim.timesteps[k])
            with torch.no_grad():
                out = conditioning.predict(unet, torch.cat([x, x]), step, torch.cat([uncond.expand(2, -1, -1), cond]))
            out = out[:2] + guidance * (out[2:] - out[:2])
            a, prev = alphas[step], step - 1000 // steps
            a_prev = alphas[prev] if prev >= 0 else ddim.final_alpha_cumprod
            if as_v:  # eps = sqrt(a) v + sqrt(1 - a) x,  x0 = sqrt(a) x - sqrt(1 - a) v
                eps, x0 = a.sqrt() * out + (1 - a).sqrt() * x, a.sqrt() * x - (1 - a).sqrt() * out
            else:
                eps, x0 = out, (x - (1 - a).sqrt() * out) / a.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x

    ddim = ddim_scheduler(scheduler)
    ddim.set_timesteps(steps)
    assert t.tolist() == [int(ddim.timesteps[stop])] * 2
    torch.testing.assert_close(x_t, manual_chain(as_v=True), atol=1e-4, rtol=1e-4)
    assert (x_t - manual_chain(as_v=False)).abs().amax() > 1e-2


def test_xt_chain_on_sdxls_euler_config_keeps_its_timesteps_and_conditions(sdxl):
    euler = EulerDiscreteScheduler.from_config(sdxl.scheduler.config)
    euler.set_timesteps(10)
    ddim = ddim_scheduler(sdxl.scheduler)
    ddim.set_timesteps(10)
    assert ddim.config.timestep_spacing == "leading" and ddim.config.steps_offset == 1
    assert ddim.timesteps.tolist() == euler.timesteps.long().tolist()  # 901, 801, ..., 1: the same grid
    cond, uncond = encode_prompts(sdxl, PROMPTS[:2]).detach(), encode_prompts(sdxl, [""])[0].detach()
    args = dict(num_steps=10, guidance=3.0, latent_shape=(4, 8, 8))
    stop = torch.tensor([2, 4])
    x_t, t = sample_xt(sdxl.unet, sdxl.scheduler, cond, uncond, stop, generator=torch.Generator().manual_seed(0),
                       **args)
    assert t.tolist() == ddim.timesteps[stop].tolist()
    other = cond.clone()
    other[:, 77] = 0  # the pooled row reaches the chain's UNet calls
    x_other, _ = sample_xt(sdxl.unet, sdxl.scheduler, other, uncond, stop,
                           generator=torch.Generator().manual_seed(0), **args)
    assert (x_t - x_other).abs().amax() > 1e-4


# -- the whole recipe on a family's rehearsal folder ---------------------------------------------------------
@pytest.mark.parametrize("family", ["sdxl", "sd21"])
def test_esd_recipe_runs_on_the_familys_rehearsal_folder(family, tmp_path):
    from stereo.config import compose
    from stereo.models.families import save_family_rehearsal
    from stereo.recipes import train

    folder = save_family_rehearsal(family, tmp_path / family)
    cfg = compose([f"model={family}", f"model.pretrained={folder}", "model.resolution=64", "method=esd",
                   "concept=church", "trainer.steps=1", "method.ddim_steps=3", "trainer.sample_steps=2",
                   "export.formats=[delta]", f"output_dir={tmp_path / 'run'}"])
    out = train(cfg)  # bf16 frozen parts as the family's conf, the fp32 student previewed as a bf16 copy
    assert len(out["losses"]) == 1 and out["samples"].is_file() and out["export_dir"].is_dir()
