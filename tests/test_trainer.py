"""The erasure trainer on its own: what it keeps in the accelerator, what a checkpoint holds, how gradients
accumulate, and the SD-1.4-shaped path (PNDM scheduler, bf16 teacher, bf16 autocast, batch 4)."""

from __future__ import annotations

import copy
import gc
import json
import weakref

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from stereo.erasure.objectives import ESDObjective, Preservation
from stereo.erasure.subsets import add_lora, select_trainable
from stereo.erasure.trainer import ErasureTrainer, TrainerSettings, make_optimizer
from stereo.models.rehearsal import rehearsal_unet, sd14_scheduler
from stereo.models.tiny import sd_scheduler, tiny_unet


class Interrupt(Exception):
    pass


@pytest.fixture
def make_accelerator():
    """A fresh Accelerator per call: accelerate's state is process-wide and fixes mixed_precision at first use."""

    def make(**kwargs) -> Accelerator:
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(cpu=True, **kwargs)

    yield make
    AcceleratorState._reset_state(reset_partial_state=True)


def objective(width: int = 64, concepts: int = 2) -> ESDObjective:
    gen = torch.Generator().manual_seed(7)
    return ESDObjective(negatives=torch.randn(concepts, 77, width, generator=gen),
                        uncond=torch.randn(77, width, generator=gen))


def settings(**overrides) -> TrainerSettings:
    return TrainerSettings(**{"steps": 2, "lr": 1e-3, "ddim_steps": 4, "latent_size": 8, **overrides})


def esd_trainer(acc, subset="xattn", base=None, scheduler=None, checkpoint_dir=None, on_log=None, **overrides):
    """ESD on the tiny UNet: a frozen teacher and an fp32 student training `subset`."""
    torch.manual_seed(0)
    base = tiny_unet() if base is None else base
    student = copy.deepcopy(base).float()
    select_trainable(student, subset)
    return ErasureTrainer(acc, student, base, scheduler or sd_scheduler(), objective(), settings(**overrides),
                          checkpoint_dir=checkpoint_dir, on_log=on_log)


def lora_trainer(acc, checkpoint_dir=None, on_log=None, **overrides):
    """LoRA with dropout: the teacher is the student with its adapter off, and dropout draws from torch's RNG."""
    torch.manual_seed(0)
    student = tiny_unet()
    add_lora(student, "xattn", rank=2, alpha=2.0, dropout=0.2)
    return ErasureTrainer(acc, student, None, sd_scheduler(), objective(), settings(**overrides),
                          checkpoint_dir=checkpoint_dir, on_log=on_log)


def trainable(trainer) -> dict[str, torch.Tensor]:
    unet = trainer.accelerator.unwrap_model(trainer.student)
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


# -- defects 5/6: what the accelerator keeps --------------------------------------------------------
def test_trainers_in_sequence_leave_nothing_in_the_accelerator(make_accelerator, tmp_path):
    acc = make_accelerator()
    with esd_trainer(acc, subset="xattn", steps=1) as first:
        first.run()
        gone = weakref.ref(first.optimizer)
    assert acc._models == [] and acc._optimizers == []
    gc.collect()
    assert gone() is None  # nothing else holds the first round's AdamW state

    second = esd_trainer(acc, subset="selfattn", checkpoint_every=1, checkpoint_dir=tmp_path / "ckpt")
    assert len(acc._models) == 1 and len(acc._optimizers) == 1
    second.run()
    checkpoint = tmp_path / "ckpt" / "step_0000001"
    assert load_file(checkpoint / "trainable.safetensors").keys() == trainable(second).keys()
    assert all(".attn1." in name for name in trainable(second))  # selfattn only: nothing of the first trainer
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["optimizer"]
    assert len(state["state"]) == len(trainable(second))
    second.close()
    assert acc._models == [] and acc._optimizers == []
    assert acc.unwrap_model(second.student) is second.student  # the plain module stays usable after close


# -- defect 8: checkpoints ---------------------------------------------------------------------------
def test_checkpoint_holds_only_trainable_tensors_and_resume_equals_an_uninterrupted_run(make_accelerator, tmp_path):
    """LoRA with dropout: the resumed run must replay dropout masks too, without RNG state in the checkpoint."""
    straight = lora_trainer(make_accelerator(), steps=4)
    straight.run()

    def crash_at_step_3(step, metrics):
        if step == 3:
            raise Interrupt
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupt), lora_trainer(make_accelerator(), steps=4, checkpoint_every=2,
                                                checkpoint_dir=ckpt, on_log=crash_at_step_3) as crashed:
        crashed.run()
    folder = ckpt / "step_0000002"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.json", "optimizer.pt", "trainable.safetensors"]
    assert json.loads((folder / "checkpoint.json").read_text()) == {"step": 2}
    tensors = load_file(folder / "trainable.safetensors")
    assert tensors.keys() == trainable(straight).keys() and all("lora" in name for name in tensors)

    resumed = lora_trainer(make_accelerator(), steps=4, checkpoint_every=2, checkpoint_dir=ckpt, resume=True)
    result = resumed.run()
    assert result.start_step == 2 and len(result.losses) == 2
    for name, value in trainable(straight).items():
        assert torch.equal(value, trainable(resumed)[name]), name


@pytest.mark.parametrize(("limit", "kept"), [(1, [3]), (2, [2, 3]), (0, [1, 2, 3]), (None, [1, 2, 3])])
def test_checkpoints_total_limit_keeps_the_newest(make_accelerator, tmp_path, limit, kept):
    trainer = esd_trainer(make_accelerator(), checkpoint_every=1, checkpoint_dir=tmp_path,
                          checkpoints_total_limit=limit)
    for step in (1, 2, 3):
        trainer.save_checkpoint(step)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step_{s:07d}" for s in kept]


def test_checkpointing_without_a_folder_fails_at_construction(make_accelerator):
    with pytest.raises(ValueError, match="checkpoint_every=50 but no checkpoint_dir.*checkpoint_every=0"):
        esd_trainer(make_accelerator(), checkpoint_every=50)


def test_resuming_with_another_parameter_subset_says_so(make_accelerator, tmp_path):
    esd_trainer(make_accelerator(), subset="xattn", checkpoint_every=1, checkpoint_dir=tmp_path).save_checkpoint(1)
    other = esd_trainer(make_accelerator(), subset="selfattn", checkpoint_every=1, checkpoint_dir=tmp_path,
                        resume=True)
    with pytest.raises(ValueError, match="another parameter subset"):
        other.run()


# -- defects 7 and 17: optimiser and gradient accumulation ------------------------------------------
def test_adamw_is_fused_on_cuda_and_torchs_default_elsewhere():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert make_optimizer(params, settings(), torch.device("cuda")).defaults["fused"] is True
    assert not make_optimizer(params, settings(), torch.device("cpu")).defaults["fused"]


def test_accumulated_gradient_is_the_mean_of_the_micro_batches(make_accelerator):
    trainer = esd_trainer(make_accelerator(), grad_accum=2)
    trainer.accumulate_gradients(step=0)
    params = [p for p in trainer.student.parameters() if p.requires_grad]
    accumulated = [p.grad.clone() for p in params]
    per_micro = []
    for micro in range(2):
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.micro_step_loss(0, micro).backward()
        per_micro.append([p.grad.clone() for p in params])
    for acc_grad, g0, g1 in zip(accumulated, *per_micro):
        mean = (g0 + g1) / 2
        assert torch.linalg.norm(acc_grad - mean) <= 1e-5 * torch.linalg.norm(mean)
    assert any(not torch.allclose(g0, g1) for g0, g1 in zip(*per_micro))  # the micro-batches differ


# -- the SD 1.4 path: PNDM scheduler, bf16 frozen teacher, bf16 autocast, checkpointing, batch 4 ----------
@pytest.mark.parametrize("teacher_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_sd14_shaped_unet_trains_with_a_half_precision_teacher_under_bf16_autocast(make_accelerator, teacher_dtype):
    """model.dtype=bf16/fp16 with trainer=gpu. fp16 weights under CPU bf16 autocast fail ("mixed dtype (CPU)"),
    and on CUDA autocast would recast them to bf16 each forward: the teacher runs outside autocast."""
    acc = make_accelerator(mixed_precision="bf16")
    torch.manual_seed(0)
    teacher = rehearsal_unet().to(teacher_dtype)  # the frozen parts as loaded
    frozen = {n: p.clone() for n, p in teacher.named_parameters()}
    student = copy.deepcopy(teacher).float()
    select_trainable(student, "noxattn")
    trainer = ErasureTrainer(acc, student, teacher, sd14_scheduler(), objective(width=32),
                             settings(batch_size=4, gradient_checkpointing=True, ddim_steps=6))
    before = trainable(trainer)
    result = trainer.run()
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert any(not torch.equal(before[n], p) for n, p in trainable(trainer).items())
    assert all(p.dtype == torch.float32 for p in trainer.student.parameters())  # the student trains in fp32
    assert all(p.dtype == teacher_dtype and torch.equal(p, frozen[n]) for n, p in teacher.named_parameters())



def drifted(trainer: ErasureTrainer) -> ErasureTrainer:
    """The student moved away from its teacher (every trainable tensor, seeded)."""
    with torch.no_grad():
        for p in trainer.student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return trainer


@pytest.mark.parametrize("per_latent", [1, 2])
def test_the_preservation_term_on_the_concepts_latents_is_lambda_times_the_kept_prompts_mse_to_the_teacher(
        make_accelerator, per_latent):
    """latents="concept" (the default): loss = MSE(eps_theta(x_t, c), eps*) + lambda MSE(eps_theta(x_t, k),
    eps_0(x_t, k)), each latent's kept prompts on its own x_t, t; zero while the student equals its teacher, the
    erasure part unchanged by the kept rows."""
    from stereo.erasure.objectives import balanced_indices
    from stereo.erasure.sampling import draw_stop_steps, sample_xt

    keep = torch.randn(3, 77, 64, generator=torch.Generator().manual_seed(11))
    trainer = esd_trainer(make_accelerator(), subset="noxattn", batch_size=2)
    obj = trainer.objective
    obj.preserve = Preservation(keep, 0.0, per_latent=per_latent)
    assert obj.preserve.latents == "concept"  # the default
    off = float(trainer.micro_step_loss(0, 0))
    obj.preserve.weight = 4.0
    torch.testing.assert_close(float(trainer.micro_step_loss(0, 0)), off)  # student == teacher: the term is 0
    drifted(trainer)
    obj.preserve.weight = 0.0
    off = float(trainer.micro_step_loss(1, 0))
    obj.preserve.weight = 4.0
    on = float(trainer.micro_step_loss(1, 0))
    # the term by hand: the same x_t, t as the trainer draws at step 1, the kept prompts of positions 2, 3
    cond = obj.sample(position=2, batch_size=2)
    generator = torch.Generator().manual_seed(trainer._seed(1, 0))
    stop = draw_stop_steps(2, trainer.settings.ddim_steps, generator)
    x_t, t = sample_xt(trainer.student, trainer.scheduler, cond.student, cond.uncond, stop, num_steps=4, guidance=3.0,
                       latent_shape=trainer.latent_shape, generator=generator)
    kept = keep[balanced_indices(3, 2 * per_latent, 2 * per_latent, seed=0 + 2)]  # latent-major
    x_k, t_k = x_t.repeat_interleave(per_latent, 0), t.repeat_interleave(per_latent, 0)
    with torch.no_grad():
        student, teacher = (unet(x_k, t_k, encoder_hidden_states=kept).sample
                            for unet in (trainer.student, trainer.teacher))
    term = 4.0 * float(torch.nn.functional.mse_loss(student, teacher))
    assert term > 1e-6
    assert on - off == pytest.approx(term, rel=1e-3)
    # focus beta = 2: the same rows, each weighed by K softmax(beta l_i / mean l) (objectives.preservation_loss)
    obj.preserve.focus = 2.0
    rows = ((student - teacher) ** 2).mean(dim=(1, 2, 3))
    focused = 4.0 * float((len(rows) * torch.softmax(2.0 * rows / rows.mean(), dim=0) * rows).mean())
    assert abs(focused - term) > 1e-3 * term
    assert float(trainer.micro_step_loss(1, 0)) - off == pytest.approx(focused, rel=1e-3)
    trainer.close()


def test_the_kept_prompts_are_regressed_on_latents_of_their_own_chain(make_accelerator):
    """latents="own", 2 kept prompts per latent: each x_k comes from the student's chain conditioned
    on its kept prompt k, drawn in one batch with the concept's chain, and loss = MSE(eps_theta(x_t, c), eps*) +
    lambda MSE(eps_theta(x_k, k, s), eps_0(x_k, k, s)) over the 4 kept rows. Computed by hand from the same draws."""
    from stereo.erasure.objectives import balanced_indices, esd_target
    from stereo.erasure.sampling import draw_stop_steps, sample_xt

    keep = torch.randn(3, 77, 64, generator=torch.Generator().manual_seed(11))
    trainer = drifted(esd_trainer(make_accelerator(), subset="noxattn", batch_size=2))
    obj = trainer.objective
    obj.preserve = Preservation(keep, 4.0, latents="own", per_latent=2)
    loss = float(trainer.micro_step_loss(1, 0))

    cond = obj.sample(position=2, batch_size=2)
    kept = keep[balanced_indices(3, 4, 4, seed=0 + 2)]  # latents 2, 3 draw kept prompts 4 .. 7 of the stream
    generator = torch.Generator().manual_seed(trainer._seed(1, 0))
    stop = draw_stop_steps(6, trainer.settings.ddim_steps, generator)
    x, t = sample_xt(trainer.student, trainer.scheduler, torch.cat([cond.student, kept]), cond.uncond, stop,
                     num_steps=4, guidance=3.0, latent_shape=trainer.latent_shape, generator=generator)
    x_t, x_k, t_c, t_k = x[:2], x[2:], t[:2], t[2:]
    assert not torch.allclose(x_t, x_k[:2])
    mse = torch.nn.functional.mse_loss
    with torch.no_grad():
        def eps(unet, latents, steps, conditions):
            return unet(latents, steps, encoder_hidden_states=conditions).sample
        target = esd_target(eps(trainer.teacher, x_t, t_c, cond.uncond.expand(2, -1, -1)),
                            eps(trainer.teacher, x_t, t_c, cond.student), obj.eta)
        erase = mse(eps(trainer.student, x_t, t_c, cond.student), target)
        term = 4.0 * mse(eps(trainer.student, x_k, t_k, kept), eps(trainer.teacher, x_k, t_k, kept))
    assert float(term) > 1e-6
    assert loss == pytest.approx(float(erase + term), rel=1e-4)
    trainer.close()
