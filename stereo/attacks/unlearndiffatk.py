"""UnlearnDiffAtk (Zhang et al. 2024, "To Generate or Not? Safety-Driven Unlearned Diffusion Models
Are Still Easy To Generate Unsafe Images"): k adversarial prefix tokens per prompt.

Each prompt gets k prefix slots, each a relaxed one-hot vector w_j on the vocabulary simplex;
the slot's input embedding is w_j @ E (E: the token-embedding table). The prefixes minimise the
EVALUATED model's denoising loss on the base model's images of the concept,

    min_w  E_{x0, eps, t} || eps_theta(x_t, c([w_1 @ E, ..., w_k @ E, prompt]), t) - eps ||^2,

with Adam steps followed by a Euclidean projection back onto the simplex. Every
`project_every` steps the slots snap to their nearest real tokens (argmax of w); with
`check_success`, the hard prompt is then generated and judged by the detector, and a prompt
stops at its first success. Prompts are optimised together in batches of `prompt_batch`.
Restart r >= 1 (`target.restart`) draws its start tokens and batches from its own seed (`restart_seed`).
The weights train in fp32 whatever the model's dtype (`stereo.attacks.precision`); the gallery
is made in `prepare`, by every process of the run together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stereo.attacks.base import (
    Attack,
    AttackedPrompt,
    AttackTarget,
    EvalPrompt,
    gallery_latents,
    register_attack,
    render,
    restart_seed,
    wrap_ids,
)
from stereo.attacks.inversion import denoising_loss
from stereo.attacks.precision import Precision


def project_to_simplex(w: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of `w` (..., V) onto {p >= 0, sum p = 1} (Duchi et al. 2008)."""
    sorted_w, _ = w.sort(dim=-1, descending=True)
    cumulative = sorted_w.cumsum(-1) - 1  # (..., V)
    ranks = torch.arange(1, w.shape[-1] + 1, device=w.device, dtype=w.dtype)
    support = (sorted_w - cumulative / ranks) > 0
    rho = support.to(w.dtype).cumsum(-1).argmax(-1, keepdim=True)  # last index where support holds
    theta = cumulative.gather(-1, rho) / (rho + 1).to(w.dtype)
    return (w - theta).clamp(min=0)


def attackable_vocabulary(tokenizer) -> torch.Tensor:
    """Ids the prefix may use: the base vocabulary without special tokens (and without added tokens)."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(tokenizer.vocab_size) if i not in special])


@contextlib.contextmanager
def soft_prefix(text_encoder, prefix: torch.Tensor, precision: Precision | None = None):
    """While active, token-embedding outputs at positions 1..k are `prefix` (B, k, D) (with gradient);
    fp32 under a `precision` that autocasts, so the prefix's gradient is never held in half precision."""
    k = prefix.shape[1]

    def hook(module, inputs, output):
        output = precision.input(output) if precision else output
        return torch.cat([output[:, :1], prefix.to(output.dtype), output[:, 1 + k:]], dim=1)

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@register_attack("unlearndiffatk")
class UnlearnDiffAtk(Attack):
    latents: torch.Tensor | None = None  # (N, 4, h, w) the base model's concept images, from `prepare`

    def prepare(self, target: AttackTarget) -> None:
        self.latents = gallery_latents(target, self.settings)

    def attack(self, target: AttackTarget, prompts: Sequence[EvalPrompt]) -> list[AttackedPrompt]:
        if self.latents is None:  # one process may skip prepare; several must all call it first (collective)
            self.prepare(target)
        size = max(1, self.settings.prompt_batch)
        attacked: list[AttackedPrompt] = []
        for start in range(0, len(prompts), size):
            attacked.extend(self._attack_batch(target, list(prompts[start:start + size]), self.latents))
        return attacked

    def _attack_batch(self, target: AttackTarget, prompts: list[EvalPrompt], latents: torch.Tensor):
        s, pipe = self.settings, target.pipe
        k, device = s.prefix_tokens, pipe.unet.device
        # restart r >= 1: its own seed, so its own random start tokens and batches
        generator = torch.Generator().manual_seed(restart_seed(s.seed, target.restart) + prompts[0].index)
        vocab = attackable_vocabulary(pipe.tokenizer)  # (V,)
        table = pipe.text_encoder.get_input_embeddings().weight.detach()[vocab.to(device)].float()  # (V, D)
        bodies = [pipe.tokenizer(p.prompt, add_special_tokens=False).input_ids for p in prompts]
        start_tokens = torch.randint(len(vocab), (len(prompts), k), generator=generator)
        weights = F.one_hot(start_tokens, len(vocab)).float().to(device).requires_grad_(True)  # (B, k, V)
        optimizer = torch.optim.Adam([weights], lr=s.lr)
        pipe.unet.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        active = torch.ones(len(prompts), dtype=torch.bool)
        done: dict[int, dict] = {}
        latents = latents.to(device)
        bar = tqdm(range(s.steps), desc=f"unlearndiffatk {len(prompts)} prompts", disable=not target.progress,
                   leave=False)
        for step in bar:
            rows = active.nonzero().flatten()
            loss = self._loss(pipe, weights, rows, table, bodies, latents, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                weights.copy_(project_to_simplex(weights))
            bar.set_postfix(loss=f"{loss.item():.4g}", left=int(active.sum()))
            if (step + 1) % s.project_every == 0 or step + 1 == s.steps:
                with torch.no_grad():  # snap to the nearest real tokens (the simplex vertex of each slot)
                    weights.copy_(F.one_hot(weights.argmax(-1), len(vocab)).float())
                if s.check_success and target.detector is not None:
                    self._check(target, prompts, rows, weights, vocab, bodies, active, done, step + 1)
                if not active.any():
                    break
        hard = vocab[weights.argmax(-1).cpu()]  # (B, k) token ids; a success keeps the prefix that succeeded
        results = []
        for i, p in enumerate(prompts):
            info = done.get(i, {"success_during_attack": False, "steps": s.steps, "prefix": hard[i].tolist()})
            results.append(self._attacked(pipe, p, info.pop("prefix"), bodies[i], info))
        return results

    def _loss(self, pipe, weights, rows, table, bodies, latents, generator) -> torch.Tensor:
        """Denoising MSE of the evaluated UNet for the active prompts' soft prefixes, one latent each."""
        device = pipe.unet.device
        ids = torch.tensor([wrap_ids(pipe.tokenizer, [0] * self.settings.prefix_tokens + bodies[int(r)])
                            for r in rows])  # placeholder ids at 1..k are replaced by the hook
        prefix = weights[rows.to(device)] @ table  # (b, k, D)
        pick = torch.randint(len(latents), (len(rows),), generator=generator)
        noise = torch.randn(latents[pick].shape, generator=generator).to(device)
        t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(rows),), generator=generator).to(device)
        x_t = pipe.scheduler.add_noise(latents[pick], noise, t)  # (b, 4, h, w)
        text, unet = Precision.of(pipe.text_encoder), Precision.of(pipe.unet)
        with text.context(), soft_prefix(pipe.text_encoder, prefix, text):
            cond = pipe.text_encoder(ids.to(device))[0]
        with unet.context():
            eps = pipe.unet(unet.input(x_t), t, encoder_hidden_states=unet.input(cond)).sample
        return denoising_loss(eps, noise)

    def _check(self, target, prompts, rows, weights, vocab, bodies, active, done, step) -> None:
        """Generate the hard prompts of the active rows; rows the detector flags stop here."""
        hard = vocab[weights.argmax(-1).cpu()]
        candidates = [self._attacked(target.pipe, prompts[int(r)], hard[int(r)].tolist(), bodies[int(r)], {})
                      for r in rows]
        detection = target.detector.detect(render(target.pipe, candidates, target.generation))
        for r, flag, score in zip(rows.tolist(), detection.flags, detection.scores):
            if flag:
                active[r] = False
                done[r] = {"success_during_attack": True, "steps": step, "score": float(score),
                           "prefix": hard[r].tolist()}

    def _attacked(self, pipe, prompt: EvalPrompt, prefix: list[int], body: list[int], info: dict) -> AttackedPrompt:
        text = pipe.tokenizer.decode(prefix) + " " + prompt.prompt
        return AttackedPrompt.of(prompt, text, token_ids=wrap_ids(pipe.tokenizer, prefix + body),
                                 info={"prefix_ids": prefix, **info})
