"""The STEREO maths: every regression target of the method, and the objectives that feed them.

Notation (STEREO.md): eps_0 is the frozen teacher UNet, eps_theta the student, ∅ the empty
prompt. Teacher predictions are computed under `torch.no_grad()` by the trainer, so targets
carry no gradient. Shapes: B latents of SD's (4, h, w); L, D the conditions' length and width
(`stereo.conditioning`: SDXL's carry the pooled embedding as an extra row).
Every target is linear in the model's outputs, so a v-prediction model (SD 2.1) runs the same formulas
with eps read as v: v = sqrt(a_t) eps - sqrt(1 - a_t) x0 is affine in eps at a fixed x_t, and the
combination's weights (1 + eta, -eta, ...) sum to one, so the v target is the eps target's v
(its MSE weighs timestep t by 1 / a_t against the eps MSE: v = eps / sqrt(a_t) - sqrt(1/a_t - 1) x_t).

An objective answers two questions for the trainer, and nothing else:
  `sample(position, batch_size)`: which condition each latent is about (x_t is sampled with it and
      the student sees it) and which M conditions the teacher is queried with -> `Conditions`;
  `target(eps_teacher)`: the (M, B, ...) teacher predictions composed into the (B, ...) target.
Optionally (`preserve`, a `Preservation` with weight lambda > 0; an extension beyond ESD and STEREO), each
latent also draws `per_latent` prompts of concepts to KEEP, and the student's predictions for them are
regressed onto the teacher's:

    loss = MSE(eps_theta(x_t, c, t), eps*) + lambda MSE(eps_theta(x_k, k, s), eps_0(x_k, k, s)),

where (x_k, s) is the erased concept's own latent (x_t, t) (`latents="concept"`, the default), or a latent
of the student's chain conditioned on k (`"own"`: the trajectories along which the erased model draws the
kept concept; on the toy it was the more robust but the less specific, docs/toy_tuning.md).
The teacher's eps_0(x_k, k) is computed in the same batched call as the target's predictions.
With `focus` beta > 0 the K kept rows are not averaged equally: row i, whose squared error is l_i, weighs

    w_i = K softmax_i(beta l_i / mean_j l_j)      (weights carry no gradient; beta = 0: w_i = 1, the plain MSE),

so the kept prompts the erasure currently moves most are pulled back hardest (a per-batch, stateless form of
distributionally robust weighting: resumes and process splits see the same loss).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Formulas
# ----------------------------------------------------------------------------------------------
def esd_target(eps_uncond: torch.Tensor, eps_concept: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD (Gandikota et al. 2023, Eq. 7): eps* = eps_0(x_t, ∅) - eta (eps_0(x_t, c) - eps_0(x_t, ∅)).

    eta = 1 is standard ESD; eta = 0 (the STEREO reference code's "negative guidance" g = 2)
    regresses the concept onto the unconditional prediction.
    """
    return eps_uncond - eta * (eps_concept - eps_uncond)  # (B, 4, h, w)


def reo_target(
    eps_uncond: torch.Tensor, eps_anchors: torch.Tensor, eps_negatives: torch.Tensor, eta_a: float, eta_n: float
) -> torch.Tensor:
    """REO's compositional target (STEREO, Srivatsan et al. 2025, Sec. 3.3):

        eps* = eps_0(∅) + eta_a mean_a (eps_0(a) - eps_0(∅)) - eta_n mean_n (eps_0(n) - eps_0(∅))

    eps_uncond: (B, 4, h, w); eps_anchors: (A, B, 4, h, w), the A anchors drawn for each latent;
    eps_negatives: (N, B, 4, h, w), every negative (concept + adversarial embeddings).
    Anchors pull the prediction toward benign context, negatives push it away from the concept.
    """
    anchor_direction = (eps_anchors - eps_uncond).mean(dim=0)  # (B, 4, h, w)
    negative_direction = (eps_negatives - eps_uncond).mean(dim=0)  # (B, 4, h, w)
    return eps_uncond + eta_a * anchor_direction - eta_n * negative_direction


def erasure_loss(eps_student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE(eps_theta(x_t, c, t), eps*) — the loss of ESD and REO alike, computed in fp32."""
    return F.mse_loss(eps_student.float(), target.float())


def preservation_loss(eps_student_keep: torch.Tensor, eps_teacher_keep: torch.Tensor, weight: float,
                      focus: float = 0.0) -> torch.Tensor:
    """lambda mean_i w_i l_i, l_i = MSE(eps_theta(x_i, k_i, t_i), eps_0(x_i, k_i, t_i)) of kept row i: the kept
    concepts predicted as the teacher does; w_i = K softmax(focus l_i / mean l) (module docstring), 1 at focus 0."""
    per_row = (eps_student_keep.float() - eps_teacher_keep.float()).pow(2).flatten(1).mean(dim=1)  # (K,)
    if focus == 0:
        return weight * per_row.mean()
    errors = per_row.detach()
    weights = len(errors) * torch.softmax(focus * errors / errors.mean().clamp_min(1e-12), dim=0)
    return weight * (weights * per_row).mean()


# ----------------------------------------------------------------------------------------------
# Balanced draws
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


# ----------------------------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------------------------
@dataclass
class Preservation:
    """The optional preservation term (module docstring): what to keep, its weight and where it is regressed."""

    prompts: torch.Tensor  # (P, L, D) the kept prompts
    weight: float  # lambda
    latents: str = "concept"  # concept | own: x_k is the concept's x_t, or from the student's chain conditioned on k
    per_latent: int = 1  # kept prompts drawn for each latent of the erasure
    focus: float = 0.0  # beta: 0 weighs the kept rows equally, > 0 weighs those moved most more (docstring)

    def draw(self, position: int, batch_size: int, seed: int) -> torch.Tensor:
        """(B * per_latent, L, D), latent-major, balanced over `prompts` (a stream of its own: `seed`)."""
        k = self.per_latent
        picks = balanced_indices(self.prompts.shape[0], position * k, batch_size * k, seed)
        return self.prompts[picks.to(self.prompts.device)]


@dataclass
class Conditions:
    """What one batch of B latents is conditioned on."""

    student: torch.Tensor  # (B, L, D): x_t is sampled with it (CFG against `uncond`), the student sees it
    uncond: torch.Tensor  # (L, D): the empty prompt
    teacher: torch.Tensor  # (M, B, L, D): the M conditions of the target, per latent
    keep: torch.Tensor | None = None  # (B * per_latent, L, D): prompts to preserve, latent-major, or None


class ErasureObjective(ABC):
    """Erase `negatives` (K, L, D); draws are positions in one balanced stream seeded by `seed`.

    `position` counts latents over the whole run (steps, micro-steps and processes interleaved by the
    trainer), not a generator: a resumed run, or another process split, draws the same sequence.
    `preserve`: the optional preservation term (module docstring), or None.
    """

    negatives: torch.Tensor
    uncond: torch.Tensor
    seed: int
    preserve: Preservation | None

    def draw_negatives(self, position: int, batch_size: int) -> torch.Tensor:
        """(B,) indices into `negatives`, balanced over the run."""
        return balanced_indices(self.negatives.shape[0], position, batch_size, self.seed).to(self.negatives.device)

    def draw_keep(self, position: int, batch_size: int) -> torch.Tensor | None:
        """(B * per_latent, L, D) prompts to preserve (`Preservation.draw`), or None when off."""
        if self.preserve is None or self.preserve.weight == 0:
            return None
        return self.preserve.draw(position, batch_size, self.seed + 2)

    @abstractmethod
    def sample(self, position: int, batch_size: int) -> Conditions:
        """The conditions of latents `position .. position + batch_size - 1`."""

    @abstractmethod
    def target(self, eps_teacher: torch.Tensor) -> torch.Tensor:
        """(M, B, 4, h, w) teacher predictions, in `sample`'s order -> (B, 4, h, w) regression target."""

    def to(self, device: torch.device, dtype: torch.dtype) -> "ErasureObjective":
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device, dtype))
        if self.preserve is not None:
            self.preserve = replace(self.preserve, prompts=self.preserve.prompts.to(device, dtype))
        return self


@dataclass
class ESDObjective(ErasureObjective):
    """ESD: eps* = eps_0(∅) - eta (eps_0(c) - eps_0(∅)) for the drawn concept embedding c."""

    negatives: torch.Tensor  # (K, L, D) the concept prompts (or STE's adversarial prompts)
    uncond: torch.Tensor  # (L, D)
    eta: float = 1.0
    seed: int = 0
    preserve: Preservation | None = None

    def sample(self, position, batch_size):
        concept = self.negatives[self.draw_negatives(position, batch_size)]  # (B, L, D)
        uncond = self.uncond.expand(batch_size, -1, -1)
        return Conditions(student=concept, uncond=self.uncond, teacher=torch.stack([uncond, concept]),  # M = 2
                          keep=self.draw_keep(position, batch_size))

    def target(self, eps_teacher):
        return esd_target(eps_teacher[0], eps_teacher[1], self.eta)


@dataclass
class REOObjective(ErasureObjective):
    """REO: eps* = eps_0(∅) + eta_a mean_a(eps_0(a) - eps_0(∅)) - eta_n mean_n(eps_0(n) - eps_0(∅)).

    Each latent is about one negative (balanced), draws `anchors_per_step` anchors (balanced over the
    anchor set, a stream of its own) and is compared against EVERY negative: all of it is one batch.
    """

    negatives: torch.Tensor  # (N, L, D) concept prompts + adversarial embeddings
    uncond: torch.Tensor  # (L, D)
    anchors: torch.Tensor  # (A, L, D)
    eta_a: float = 1.0
    eta_n: float = 3.0
    anchors_per_step: int = 1
    seed: int = 0
    preserve: Preservation | None = None

    def sample(self, position, batch_size):
        per = self.anchors_per_step
        picks = balanced_indices(self.anchors.shape[0], position * per, batch_size * per, self.seed + 1)
        anchors = self.anchors[picks.view(batch_size, per).T.to(self.anchors.device)]  # (a, B, L, D)
        negatives = self.negatives[:, None].expand(-1, batch_size, -1, -1)  # (N, B, L, D)
        uncond = self.uncond.expand(1, batch_size, -1, -1)  # (1, B, L, D)
        return Conditions(student=self.negatives[self.draw_negatives(position, batch_size)], uncond=self.uncond,
                          teacher=torch.cat([uncond, anchors, negatives]),  # M = 1 + a + N
                          keep=self.draw_keep(position, batch_size))

    def target(self, eps_teacher):
        a = self.anchors_per_step
        return reo_target(eps_teacher[0], eps_teacher[1:1 + a], eps_teacher[1 + a:], self.eta_a, self.eta_n)
