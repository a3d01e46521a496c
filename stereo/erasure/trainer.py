"""The erasure trainer: fine-tune a student UNet toward teacher-built targets with accelerate.

One step, for each of B latents per process (STEREO.md):
  1. draw which negative the latent is about (balanced round robin over the negatives);
  2. x_t, t <- the student's own DDIM chain conditioned on that negative, stopped at i ∈ [1, 49);
  3. every teacher prediction the objective needs (∅, negatives, anchors) in ONE batched forward;
  4. target <- objective.target(...)  (ESD or REO formula, `stereo.objectives`);
  5. loss = MSE(eps_theta(x_t, negative, t), target); backward; optimiser step.
Each (process, step) draws from its own seeded generator, so a resumed run replays the exact
random stream of an uninterrupted one, and ranks never share latents.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from stereo.erasure.sampling import draw_stop_steps, sample_xt
from stereo.objectives import erasure_loss, esd_target, reo_target

log = logging.getLogger(__name__)
CHECKPOINT_DONE = "checkpoint.json"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped before the bad update reached the weights."""


# ----------------------------------------------------------------------------------------------
# Objectives: which embeddings condition the student and how the teacher target is composed.
# ----------------------------------------------------------------------------------------------
def balanced_indices(num_items: int, start: int, count: int, seed: int) -> torch.Tensor:
    """Items `start .. start+count-1` of an endless sequence of seeded permutations of range(num_items).

    Every item appears exactly once per `num_items` draws, so sampling stays balanced however
    the draws are split across steps, processes and resumes.
    """
    out = []
    for position in range(start, start + count):
        epoch, offset = divmod(position, num_items)
        perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[offset]))
    return torch.tensor(out, dtype=torch.long)


class ErasureObjective(ABC):
    """`negatives` (K, L, D): the embeddings to erase; x_t is sampled with, and the student sees, one of them."""

    negatives: torch.Tensor
    uncond: torch.Tensor  # (L, D) embedding of the empty prompt

    @abstractmethod
    def teacher_embeddings(self, negative_idx: torch.Tensor, draw: int, seed: int) -> torch.Tensor:
        """(M, B, L, D): the M conditions the teacher is queried with for each of the B latents."""

    @abstractmethod
    def target(self, eps_teacher: torch.Tensor) -> torch.Tensor:
        """(M, B, 4, h, w) teacher predictions -> (B, 4, h, w) regression target."""

    def to(self, device: torch.device, dtype: torch.dtype) -> "ErasureObjective":
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device, dtype))
        return self


@dataclass
class ESDObjective(ErasureObjective):
    """ESD: eps* = eps_0(∅) - eta (eps_0(c) - eps_0(∅)) for the drawn concept embedding c."""

    negatives: torch.Tensor
    uncond: torch.Tensor
    eta: float = 1.0

    def teacher_embeddings(self, negative_idx, draw, seed):
        batch = negative_idx.shape[0]
        uncond = self.uncond.expand(batch, -1, -1)
        return torch.stack([uncond, self.negatives[negative_idx]])  # (2, B, L, D)

    def target(self, eps_teacher):
        return esd_target(eps_teacher[0], eps_teacher[1], self.eta)


@dataclass
class REOObjective(ErasureObjective):
    """REO: eps* = eps_0(∅) + eta_a mean_a(eps_0(a) - eps_0(∅)) - eta_n mean_n(eps_0(n) - eps_0(∅)).

    Each latent draws `anchors_per_step` anchors (balanced over the anchor set) and is compared
    against EVERY negative; with the student's negative also balanced, all of it is one batch.
    """

    negatives: torch.Tensor  # (N, L, D) concept prompts + adversarial embeddings
    uncond: torch.Tensor  # (L, D)
    anchors: torch.Tensor  # (A, L, D)
    eta_a: float = 1.0
    eta_n: float = 3.0
    anchors_per_step: int = 1

    def teacher_embeddings(self, negative_idx, draw, seed):
        batch, per = negative_idx.shape[0], self.anchors_per_step
        picks = balanced_indices(self.anchors.shape[0], draw * per, batch * per, seed + 1)
        anchors = self.anchors[picks.view(batch, per).T.to(self.anchors.device)]  # (a, B, L, D)
        negatives = self.negatives[:, None].expand(-1, batch, -1, -1)  # (N, B, L, D)
        uncond = self.uncond.expand(1, batch, -1, -1)  # (1, B, L, D)
        return torch.cat([uncond, anchors, negatives])  # (1 + a + N, B, L, D)

    def target(self, eps_teacher):
        a = self.anchors_per_step
        return reo_target(eps_teacher[0], eps_teacher[1:1 + a], eps_teacher[1 + a:], self.eta_a, self.eta_n)


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainerSettings:
    steps: int
    lr: float
    batch_size: int = 1
    grad_accum: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0
    resume: bool = False
    log_every: int = 1
    sample_every: int = 0  # call on_sample(step, unet) every N steps (0 = never)
    ddim_steps: int = 50
    sample_guidance: float = 3.0
    latent_size: int = 64  # resolution // the VAE's downsampling factor
    seed: int = 0
    desc: str = "erase"


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # mean over processes
    local_losses: list[float] = field(default_factory=list)  # this process's own
    start_step: int = 0
    steps: int = 0
    seconds: float = 0.0


@contextlib.contextmanager
def adapters_disabled(unet):
    """The base model under a LoRA adapter: the natural teacher when only the adapter trains."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


class ErasureTrainer:
    """Trains `student`'s parameters that require grad toward `objective`'s targets.

    `teacher`: a frozen UNet, or None when the student carries a LoRA adapter (the teacher is
    then the student with its adapter disabled: no second copy of the weights in memory).
    """

    def __init__(self, accelerator: Accelerator, student, teacher, scheduler, objective: ErasureObjective,
                 settings: TrainerSettings, checkpoint_dir: Path | None = None, on_log=None, on_sample=None):
        self.accelerator = accelerator
        self.settings = settings
        self.scheduler = scheduler
        self.checkpoint_dir = checkpoint_dir
        self.on_log = on_log  # callable(step, metrics) for loggers
        self.on_sample = on_sample  # callable(step, unet) for sample grids during training
        if settings.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        params = [p for p in student.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the student UNet has no trainable parameters; select a subset or LoRA first")
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.student, self.optimizer = accelerator.prepare(student, optimizer)
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False).eval().to(accelerator.device)
        self.objective = objective.to(accelerator.device, torch.float32)
        size = settings.latent_size
        self.latent_shape = (self._unwrapped.config.in_channels, size, size)

    @property
    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.student)

    # -- one step --------------------------------------------------------------------------
    def _generator(self, step: int, micro: int) -> torch.Generator:
        rank = self.accelerator.process_index
        seed = ((self.settings.seed * 1_000_003 + step) * 1_009 + micro) * 65_537 + rank
        device = self.accelerator.device
        return torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)

    def _teacher_eps(self, x_t: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """All M teacher conditions for all B latents in one batched forward: (M, B, 4, h, w)."""
        m, b = embeddings.shape[:2]
        teacher = self.teacher
        context = contextlib.nullcontext() if teacher is not None else adapters_disabled(self._unwrapped)
        with torch.no_grad(), context, self.accelerator.autocast():
            unet = teacher if teacher is not None else self._unwrapped
            dtype = next(unet.parameters()).dtype
            eps = unet(x_t.repeat(m, 1, 1, 1).to(dtype), t.repeat(m),
                       encoder_hidden_states=embeddings.flatten(0, 1).to(dtype)).sample
        return eps.float().view(m, b, *x_t.shape[1:])

    def _micro_step(self, step: int, micro: int) -> torch.Tensor:
        s, obj = self.settings, self.objective
        world = self.accelerator.num_processes
        draw = ((step * s.grad_accum + micro) * world + self.accelerator.process_index) * s.batch_size
        negative_idx = balanced_indices(obj.negatives.shape[0], draw, s.batch_size, s.seed).to(obj.negatives.device)
        cond = obj.negatives[negative_idx]  # (B, L, D)
        generator = self._generator(step, micro)
        stop = draw_stop_steps(s.batch_size, s.ddim_steps, generator)
        self._unwrapped.eval()
        with self.accelerator.autocast():
            x_t, t = sample_xt(self._unwrapped, self.scheduler, cond, obj.uncond, stop, num_steps=s.ddim_steps,
                               guidance=s.sample_guidance, latent_shape=self.latent_shape, generator=generator)
        target = obj.target(self._teacher_eps(x_t, t, obj.teacher_embeddings(negative_idx, draw, s.seed)))
        self.student.train()
        eps = self.student(x_t, t, encoder_hidden_states=cond).sample  # autocast applied by accelerate
        return erasure_loss(eps, target)

    def _check_finite(self, loss: torch.Tensor, step: int) -> float:
        value = self.accelerator.gather(loss.detach().reshape(1)).float()
        if not torch.isfinite(value).all():
            last = _latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir else None
            raise NonFiniteLossError(
                f"the loss became {value.tolist()} at step {step + 1}; the weights were not updated. "
                f"Last good checkpoint: {last or 'none'}. Lower trainer.lr, use mixed_precision=bf16 instead "
                "of fp16, or set trainer.max_grad_norm."
            )
        return float(value.mean())

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        s, acc = self.settings, self.accelerator
        start = self._maybe_resume()
        result = TrainResult(start_step=start, steps=s.steps)
        bar = tqdm(total=s.steps, initial=start, desc=s.desc, disable=not acc.is_local_main_process)
        began = time.perf_counter()
        for step in range(start, s.steps):
            total = local = 0.0
            for micro in range(s.grad_accum):
                loss = self._micro_step(step, micro)
                total += self._check_finite(loss, step) / s.grad_accum
                local += float(loss.detach()) / s.grad_accum
                acc.backward(loss / s.grad_accum)
            if s.max_grad_norm is not None:
                acc.clip_grad_norm_(self.student.parameters(), s.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            result.losses.append(total)
            result.local_losses.append(local)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4g}")
            if self.on_log is not None and (step + 1) % max(s.log_every, 1) == 0:
                self.on_log(step + 1, {f"{s.desc}/loss": total})
            if self.on_sample is not None and s.sample_every and (step + 1) % s.sample_every == 0:
                self.on_sample(step + 1, self._unwrapped)
            if s.checkpoint_every and (step + 1) % s.checkpoint_every == 0 and step + 1 < s.steps:
                self.save_checkpoint(step + 1)
        bar.close()
        result.seconds = time.perf_counter() - began
        return result

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        """accelerate state (weights, optimiser, RNG) into checkpoints/step_N, made visible by a rename."""
        acc, root = self.accelerator, self.checkpoint_dir
        if root is None:
            raise ValueError("checkpoint_every > 0 needs a checkpoint directory")
        final, tmp = root / f"step_{step:07d}", root / f".tmp_step_{step:07d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / CHECKPOINT_DONE).write_text(json.dumps({"step": step}))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in sorted(root.glob("step_*"))[:-2]:  # keep the two newest
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _maybe_resume(self) -> int:
        if not self.settings.resume or self.checkpoint_dir is None:
            return 0
        last = _latest_checkpoint(self.checkpoint_dir)
        if last is None:
            log.info("trainer.resume=true but no finished checkpoint in %s; starting at step 0", self.checkpoint_dir)
            return 0
        self.accelerator.load_state(str(last))
        step = json.loads((last / CHECKPOINT_DONE).read_text())["step"]
        log.info("resumed from %s (step %d)", last, step)
        return step


def _latest_checkpoint(root: Path | None) -> Path | None:
    if root is None or not root.is_dir():
        return None
    done = [p for p in sorted(root.glob("step_*")) if (p / CHECKPOINT_DONE).is_file()]
    return done[-1] if done else None

