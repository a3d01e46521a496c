"""The erasure trainer: fine-tune a student UNet toward teacher-built targets with accelerate.

One step, for each of B latents per process (STEREO.md):
  1. draw which negative the latent is about (balanced round robin over the negatives);
  2. x_t, t <- the student's own DDIM chain conditioned on that negative, stopped at i ∈ [1, 49);
  3. every teacher prediction the objective needs (∅, negatives, anchors) in ONE batched forward;
  4. target <- objective.target(...)  (ESD or REO formula, `stereo.objectives`);
  5. loss = MSE(eps_theta(x_t, negative, t), target); backward; optimiser step.
With `grad_accum` micro-steps per step, each loss is divided by grad_accum (the gradient is
their mean) and processes all-reduce gradients once per step, on the last micro-step.
Each (process, step, micro-step) draws from its own seed (latents, stop steps, dropout), so a
resumed run replays the exact random stream of an uninterrupted one, and ranks never share latents.

Precision: the student trains in fp32 under the accelerator's autocast; a frozen half-precision
teacher runs as it is (no autocast), its inputs cast to its dtype; targets and losses are fp32.
Checkpoints (`checkpoints/step_N`) hold the trainable tensors, their optimiser state and the step:
the frozen weights come back from the base model. `close()` (or `with ErasureTrainer(...)`) makes
the accelerator forget this trainer's model and optimiser, so trainers can run one after another.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from stereo.erasure.sampling import draw_stop_steps, sample_xt
from stereo.objectives import erasure_loss, esd_target, reo_target

log = logging.getLogger(__name__)
CHECKPOINT_DONE = "checkpoint.json"  # written last: a folder with it is a finished checkpoint
CHECKPOINT_TENSORS = "trainable.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.pt"


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
    checkpoints_total_limit: int | None = 2  # newest checkpoints kept (0 or None = keep all)
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

    def _teacher_eps(self, x_t: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """All M teacher conditions for all B latents in one batched forward: (M, B, 4, h, w).

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
        with torch.no_grad(), base, precision:
            eps = unet(x_t.repeat(m, 1, 1, 1).to(dtype), t.repeat(m),
                       encoder_hidden_states=embeddings.flatten(0, 1).to(dtype)).sample
        return eps.float().view(m, b, *x_t.shape[1:])

    def micro_step_loss(self, step: int, micro: int) -> torch.Tensor:
        """The loss of micro-step `micro` of optimiser step `step` (steps 1-5 above, before backward)."""
        s, obj = self.settings, self.objective
        world = self.accelerator.num_processes
        draw = ((step * s.grad_accum + micro) * world + self.accelerator.process_index) * s.batch_size
        negative_idx = balanced_indices(obj.negatives.shape[0], draw, s.batch_size, s.seed).to(obj.negatives.device)
        cond = obj.negatives[negative_idx]  # (B, L, D)
        seed, device = self._seed(step, micro), self.accelerator.device
        generator = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)
        stop = draw_stop_steps(s.batch_size, s.ddim_steps, generator)
        self._unwrapped.eval()
        with self.accelerator.autocast():
            x_t, t = sample_xt(self._unwrapped, self.scheduler, cond, obj.uncond, stop, num_steps=s.ddim_steps,
                               guidance=s.sample_guidance, latent_shape=self.latent_shape, generator=generator)
        target = obj.target(self._teacher_eps(x_t, t, obj.teacher_embeddings(negative_idx, draw, s.seed)))
        self.student.train()
        with self._seeded_global_rng(seed):
            eps = self.student(x_t, t, encoder_hidden_states=cond).sample  # autocast applied by accelerate
        return erasure_loss(eps, target)

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

    # -- checkpoints -------------------------------------------------------------------------
    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self._unwrapped.named_parameters() if p.requires_grad}

    def save_checkpoint(self, step: int) -> Path:
        """Trainable tensors, their optimiser state and the step into checkpoints/step_N, made visible by a rename.

        The main process writes (every process holds the same weights); the others wait for it.
        """
        acc, root = self.accelerator, self.checkpoint_dir
        final, tmp = root / f"step_{step:07d}", root / f".tmp_step_{step:07d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file({name: p.detach().cpu().contiguous() for name, p in self._trainable().items()},
                      tmp / CHECKPOINT_TENSORS)
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None  # fp16 loss scale
            torch.save({"optimizer": self.optimizer.state_dict(), "grad_scaler": scaler}, tmp / CHECKPOINT_OPTIMIZER)
            (tmp / CHECKPOINT_DONE).write_text(json.dumps({"step": step}))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self._prune_checkpoints()
        acc.wait_for_everyone()
        return final

    def _prune_checkpoints(self) -> None:
        keep = self.settings.checkpoints_total_limit
        if keep:
            for old in sorted(self.checkpoint_dir.glob("step_*"))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    def _maybe_resume(self) -> int:
        if not self.settings.resume or self.checkpoint_dir is None:
            return 0
        last = _latest_checkpoint(self.checkpoint_dir)
        if last is None:
            log.info("trainer.resume=true but no finished checkpoint in %s; starting at step 0", self.checkpoint_dir)
            return 0
        self.load_checkpoint(last)
        step = json.loads((last / CHECKPOINT_DONE).read_text())["step"]
        log.info("resumed from %s (step %d)", last, step)
        return step

    def load_checkpoint(self, folder: Path) -> None:
        """Every process loads the trainable tensors and optimiser state that `save_checkpoint` wrote."""
        if not (folder / CHECKPOINT_TENSORS).is_file():
            raise ValueError(f"{folder} has no {CHECKPOINT_TENSORS}: it was written by an older version (accelerate "
                             "state); resume with that version, or start a new output_dir")
        tensors, params = load_file(folder / CHECKPOINT_TENSORS), self._trainable()
        if tensors.keys() != params.keys():
            raise ValueError(
                f"{folder} holds {len(tensors)} trainable tensors that do not match this run's {len(params)} "
                f"(e.g. {sorted(tensors.keys() ^ params.keys())[:3]}): it was written with another parameter "
                "subset or LoRA setting. Resume with the same method settings, or start a new output_dir."
            )
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])
        state = torch.load(folder / CHECKPOINT_OPTIMIZER, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if state["grad_scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])


def make_optimizer(params: list[torch.nn.Parameter], settings: TrainerSettings, device: torch.device):
    """AdamW; fused on CUDA (one kernel over all tensors, without the multi-tensor path's temporaries)."""
    fused = True if device.type == "cuda" else None  # None: torch's default for the device
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=fused)


def _latest_checkpoint(root: Path | None) -> Path | None:
    if root is None or not root.is_dir():
        return None
    done = [p for p in sorted(root.glob("step_*")) if (p / CHECKPOINT_DONE).is_file()]
    return done[-1] if done else None

