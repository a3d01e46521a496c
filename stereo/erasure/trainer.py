"""The erasure trainer: fine-tune a student UNet toward teacher-built targets with accelerate.

One step, for each of B latents per process (STEREO.md):
  1. objective.sample(): the negative the latent is about (balanced) and the teacher's conditions;
  2. x_t, t <- the student's own DDIM chain conditioned on that negative, stopped at i ∈ [1, 49);
  3. every teacher prediction the objective needs (∅, negatives, anchors) in ONE batched forward;
  4. target <- objective.target(...)  (ESD or REO formula, `stereo.erasure.objectives`);
  5. loss = MSE(eps_theta(x_t, negative, t), target) [+ the optional preservation term, its kept prompts'
     latents drawn in the same chain as step 2's]; backward; step.
With `grad_accum` micro-steps per step, each loss is divided by grad_accum (the gradient is
their mean) and processes all-reduce gradients once per step, on the last micro-step.
Each (process, step, micro-step) draws from its own seed (latents, stop steps, dropout), so a
resumed run replays the exact random stream of an uninterrupted one, and ranks never share latents.

Precision: the student trains in fp32 under the accelerator's autocast; a frozen half-precision
teacher runs as it is (no autocast), its inputs cast to its dtype; targets and losses are fp32.
(Attacks optimise a few vectors through frozen models instead: their rule is `stereo/attacks/precision.py`.)
Checkpoints (`checkpoints/step_N`) hold the trainable tensors, their optimiser state and the step:
the frozen weights come back from the base model. `close()` (or `with ErasureTrainer(...)`) makes
the accelerator forget this trainer's model and optimiser, so trainers can run one after another.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from stereo.conditioning import predict
from stereo.erasure.checkpoints import checkpoint_step, latest_checkpoint, load_checkpoint, save_checkpoint
from stereo.erasure.objectives import ErasureObjective, erasure_loss, preservation_loss
from stereo.erasure.sampling import draw_stop_steps, sample_xt

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped before the bad update reached the weights."""


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
    checkpoints_total_limit: int | None = 2  # newest checkpoints kept (0 or None = keep all)
    resume: bool = False
    log_every: int = 1
    sample_every: int = 0  # call on_sample(step, unet) every N steps (0 = never)
    ddim_steps: int = 50  # the DDIM grid x_t is sampled on
    xt_guidance: float = 3.0  # CFG scale of the student's x_t chain
    latent_size: int = 64  # resolution // the VAE's downsampling factor
    seed: int = 0
    desc: str = "erase"

    @classmethod
    def from_config(cls, cfg, latent_size: int, **overrides) -> "TrainerSettings":
        """`trainer.*` settings of the same name, `method.ddim_steps/xt_guidance`, `seed`, then `overrides`."""
        values = {f.name: cfg.trainer[f.name] for f in fields(cls) if f.name in cfg.trainer}
        values.update(ddim_steps=cfg.method.ddim_steps, xt_guidance=cfg.method.xt_guidance, seed=cfg.seed,
                      latent_size=latent_size)
        return cls(**{**values, **overrides})


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
    `scheduler`: the model's scheduler; only its config is used (x_t comes from DDIM, `sample_xt`).
    Use it as a context manager, or call `close()` once done with it (see there).
    """

    def __init__(self, accelerator: Accelerator, student, teacher, scheduler, objective: ErasureObjective,
                 settings: TrainerSettings, checkpoint_dir: Path | None = None, on_log=None, on_sample=None):
        if settings.checkpoint_every > 0 and checkpoint_dir is None:
            raise ValueError(
                f"{settings.desc}: checkpoint_every={settings.checkpoint_every} but no checkpoint_dir to save into; "
                "pass checkpoint_dir=<folder>, or set checkpoint_every=0 (trainer.checkpoint_every=0) to train "
                "without checkpoints"
            )
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
        optimizer = make_optimizer(params, settings, accelerator.device)
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

    # -- releasing what prepare() took -----------------------------------------------------------
    def __enter__(self) -> "ErasureTrainer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Make the accelerator forget this trainer's model and optimiser, and free cached device memory.

        `accelerator.prepare` keeps every prepared model and optimiser (`_models`, `_optimizers`) for
        the accelerator's lifetime: without this, each STE round's UNet and AdamW state would stay in
        memory, and accelerate-level saving would include them. Only this trainer's objects go (other
        trainers on the same accelerator keep theirs). Afterwards `student` is the plain (unwrapped)
        module: take weights from it, not from a DDP wrapper.
        """
        if self.optimizer is None:
            return
        acc, unet = self.accelerator, self._unwrapped
        acc._models = [m for m in acc._models if acc.unwrap_model(m) is not unet]
        acc._optimizers = [o for o in acc._optimizers if o is not self.optimizer]
        self.student, self.optimizer = unet, None
        gc.collect()  # the DDP wrapper and its reducer hold reference cycles
        if acc.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- one step --------------------------------------------------------------------------
    def _seed(self, step: int, micro: int) -> int:
        rank = self.accelerator.process_index
        return ((self.settings.seed * 1_000_003 + step) * 1_009 + micro) * 65_537 + rank

    @contextlib.contextmanager
    def _seeded_global_rng(self, seed: int):
        """torch's global RNG (dropout) seeded for this micro-step and restored after: a resumed run
        draws the same dropout masks without RNG state in the checkpoint."""
        device = self.accelerator.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield

    def _teacher_eps(self, x_t: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor,
                     keep: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        """All M teacher conditions for all B latents in one batched forward: (M, B, 4, h, w).

        `keep` = (x_k, t_k, k): the kept prompts at their latents, predicted in the same forward. Returns
        ((M, B, 4, h, w), (K, 4, h, w) for `keep`, or None).
        fp32 weights (the LoRA base, fp32 models) run under the accelerator's autocast like the
        student; half-precision weights run as they are, outside autocast, inputs cast to their dtype:
        bf16 autocast would recast fp16 weights to bf16 on every forward (on CPU it cannot run them).
        """
        m, b = embeddings.shape[:2]
        unet = self.teacher if self.teacher is not None else self._unwrapped
        base = adapters_disabled(unet) if self.teacher is None else contextlib.nullcontext()
        dtype = next(unet.parameters()).dtype
        precision = (self.accelerator.autocast() if dtype == torch.float32
                     else torch.autocast(self.accelerator.device.type, enabled=False))
        x, steps, conditions = x_t.repeat(m, 1, 1, 1), t.repeat(m), embeddings.flatten(0, 1)
        if keep is not None:
            x, steps, conditions = (torch.cat([a, k]) for a, k in zip((x, steps, conditions), keep))
        with torch.no_grad(), base, precision:
            eps = predict(unet, x.to(dtype), steps, conditions.to(dtype)).float()
        return eps[:m * b].view(m, b, *x_t.shape[1:]), None if keep is None else eps[m * b:]

    def micro_step_loss(self, step: int, micro: int) -> torch.Tensor:
        """The loss of micro-step `micro` of optimiser step `step` (steps 1-5 above, before backward)."""
        s, acc = self.settings, self.accelerator
        position = ((step * s.grad_accum + micro) * acc.num_processes + acc.process_index) * s.batch_size
        cond = self.objective.sample(position, s.batch_size)
        seed = self._seed(step, micro)
        generator = torch.Generator(device=acc.device if acc.device.type == "cuda" else "cpu").manual_seed(seed)
        keep = cond.keep  # the optional preservation term: K = B * per_latent kept prompts, latent-major
        own = keep is not None and self.objective.preserve.latents == "own"
        chain = torch.cat([cond.student, keep]) if own else cond.student  # own: the kept prompts' chains too
        stop = draw_stop_steps(len(chain), s.ddim_steps, generator)
        self._unwrapped.eval()
        with acc.autocast():
            x, steps = sample_xt(self._unwrapped, self.scheduler, chain, cond.uncond, stop,
                                 num_steps=s.ddim_steps, guidance=s.xt_guidance, latent_shape=self.latent_shape,
                                 generator=generator)
        b = len(cond.student)
        x_t, t = x[:b], steps[:b]
        kept = None  # (x_k, t_k, k): own, the chain's last K latents; concept, each x_t once per kept prompt
        if keep is not None:
            per = len(keep) // b
            kept = (x[b:], steps[b:], keep) if own else (x_t.repeat_interleave(per, 0), t.repeat_interleave(per, 0),
                                                         keep)
        eps_teacher, eps_teacher_keep = self._teacher_eps(x_t, t, cond.teacher, kept)
        target = self.objective.target(eps_teacher)
        self.student.train()
        with self._seeded_global_rng(seed):  # autocast applied by accelerate
            if kept is None:
                return erasure_loss(predict(self.student, x_t, t, cond.student), target)
            eps = predict(self.student, torch.cat([x_t, kept[0]]), torch.cat([t, kept[1]]),
                          torch.cat([cond.student, keep]))
        keep_term = preservation_loss(eps[b:], eps_teacher_keep, self.objective.preserve.weight,
                                      self.objective.preserve.focus)
        return erasure_loss(eps[:b], target) + keep_term

    def accumulate_gradients(self, step: int) -> tuple[float, float]:
        """Backward through the step's `grad_accum` micro-steps; returns (mean loss over processes, this one's).

        Each loss is divided by grad_accum, so the gradient is the micro-batches' mean. Under DDP the
        gradients are all-reduced once, in the last micro-step's backward (`no_sync` on the others).
        """
        s, acc = self.settings, self.accelerator
        total = local = 0.0
        for micro in range(s.grad_accum):
            last = micro == s.grad_accum - 1
            with contextlib.nullcontext() if last else acc.no_sync(self.student):
                loss = self.micro_step_loss(step, micro)
                total += self._check_finite(loss, step) / s.grad_accum
                local += float(loss.detach()) / s.grad_accum
                acc.backward(loss / s.grad_accum)
        return total, local

    def _check_finite(self, loss: torch.Tensor, step: int) -> float:
        value = self.accelerator.gather(loss.detach().reshape(1)).float()
        if not torch.isfinite(value).all():
            last = latest_checkpoint(self.checkpoint_dir)
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
            total, local = self.accumulate_gradients(step)
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

    # -- checkpoints (the format: stereo/erasure/checkpoints.py) ---------------------------------
    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self._unwrapped.named_parameters() if p.requires_grad}

    def save_checkpoint(self, step: int) -> Path:
        """`checkpoints/step_N`, written by the main process (every process holds the same weights); the others wait."""
        acc, final = self.accelerator, self.checkpoint_dir / f"step_{step:07d}"
        if acc.is_main_process:
            save_checkpoint(self.checkpoint_dir, step, self._trainable(), self.optimizer, acc.scaler,
                            keep=self.settings.checkpoints_total_limit)
        acc.wait_for_everyone()
        return final

    def _maybe_resume(self) -> int:
        if not self.settings.resume or self.checkpoint_dir is None:
            return 0
        last = latest_checkpoint(self.checkpoint_dir)
        if last is None:
            log.info("trainer.resume=true but no finished checkpoint in %s; starting at step 0", self.checkpoint_dir)
            return 0
        load_checkpoint(last, self._trainable(), self.optimizer, self.accelerator.scaler)  # on every process
        log.info("resumed from %s (step %d)", last, checkpoint_step(last))
        return checkpoint_step(last)


def make_optimizer(params: list[torch.nn.Parameter], settings: TrainerSettings, device: torch.device):
    """AdamW; fused on CUDA (one kernel over all tensors, without the multi-tensor path's temporaries)."""
    fused = True if device.type == "cuda" else None  # None: torch's default for the device
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=fused)
