"""UnlearnDiffAtk (Zhang et al. 2024, "To Generate or Not? Safety-Driven Unlearned Diffusion Models
Are Still Easy To Generate Unsafe Images"): k adversarial prefix tokens per prompt.

Each prompt gets k prefix slots, each a relaxed one-hot vector w_j on the vocabulary simplex;
the slot's input embedding is w_j @ E (E: the token-embedding table). The prefixes minimise the
EVALUATED model's denoising loss on the base model's images of the concept,

    min_w  E_{x0, eps, t} || f_theta(x_t, c([w_1 @ E, ..., w_k @ E, prompt]), t) - target ||^2,

(target: eps, or v on a v-prediction model, `inversion.denoising_batch`) with Adam steps followed
by a Euclidean projection back onto the simplex. Every `project_every` steps the slots snap to
their nearest real tokens (argmax of w); with `check_success`, the hard prompt is then generated
and judged by the detector, and a prompt stops at its first success. Prompts are optimised
together in batches of `prompt_batch`.
On SDXL one w_j drives both text towers: slot j reads w_j @ E_1 in tower 1 and w_j @ E_2 in tower 2,
over the token ids both tokenizers share, so the hard prefix is the same token ids in both.
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
from stereo.attacks.inversion import denoising_batch, denoising_loss
from stereo.attacks.precision import Precision
from stereo.conditioning import encode_tokens, predict, text_towers


def project_to_simplex(w: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of `w` (..., V) onto {p >= 0, sum p = 1} (Duchi et al. 2008)."""
    sorted_w, _ = w.sort(dim=-1, descending=True)
    cumulative = sorted_w.cumsum(-1) - 1  # (..., V)
    ranks = torch.arange(1, w.shape[-1] + 1, device=w.device, dtype=w.dtype)
    support = (sorted_w - cumulative / ranks) > 0
    rho = support.to(w.dtype).cumsum(-1).argmax(-1, keepdim=True)  # last index where support holds
    theta = cumulative.gather(-1, rho) / (rho + 1).to(w.dtype)
    return (w - theta).clamp(min=0)


def attackable_vocabulary(tokenizer, *others) -> torch.Tensor:
    """Ids the prefix may use: the base vocabulary without special tokens (and without added tokens).

    With `others` (SDXL's tokenizer_2), the ids every tokenizer reads as the same token and none treats as
    special (SDXL's tokenizer_2 pads with "!"), so one id means one token in every text tower.
    """
    special = set(tokenizer.all_special_ids).union(*(other.all_special_ids for other in others))
    size = min([tokenizer.vocab_size, *(other.vocab_size for other in others)])
    if others:
        pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
        for other in others:
            if other.convert_ids_to_tokens(list(range(size))) != pieces:
                raise ValueError("the pipeline's tokenizers number their vocabularies differently; a hard prefix "
                                 "needs one id per token in every text tower")
    return torch.tensor([i for i in range(size) if i not in special])


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


@contextlib.contextmanager
def soft_prefixes(pipe, prefixes: list[torch.Tensor], precision: Precision | None = None):
    """`soft_prefix` in every text tower at once: tower i reads `prefixes[i]` (B, k, d_i)."""
    with contextlib.ExitStack() as stack:
        for (_, encoder), prefix in zip(text_towers(pipe), prefixes):
            stack.enter_context(soft_prefix(encoder, prefix, precision and Precision.of(encoder)))
        yield


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
        towers = text_towers(pipe)
        vocab = attackable_vocabulary(*(tokenizer for tokenizer, _ in towers))  # (V,)
        tables = [encoder.get_input_embeddings().weight.detach()[vocab.to(device)].float()
                  for _, encoder in towers]  # (V, d_i) per tower
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
            loss = self._loss(pipe, weights, rows, tables, bodies, latents, generator)
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

    def _loss(self, pipe, weights, rows, tables, bodies, latents, generator) -> torch.Tensor:
        """Denoising MSE of the evaluated UNet for the active prompts' soft prefixes, one latent each.

        `tables`: each text tower's embedding rows of the attackable vocabulary, (V, d_i).
        """
        device = pipe.unet.device
        ids = [torch.tensor([wrap_ids(tokenizer, [0] * self.settings.prefix_tokens + bodies[int(r)]) for r in rows])
               for tokenizer, _ in text_towers(pipe)]  # placeholder ids at 1..k are replaced by the hooks
        prefixes = [weights[rows.to(device)] @ table for table in tables]  # (b, k, d_i) per tower
        x_t, t, target = denoising_batch(pipe.scheduler, latents, len(rows), generator)  # (b, 4, h, w)
        text, unet = Precision.of(pipe.text_encoder), Precision.of(pipe.unet)
        with text.context(), soft_prefixes(pipe, prefixes, text):
            cond = encode_tokens(pipe, ids)
        with unet.context():
            prediction = predict(pipe.unet, unet.input(x_t), t, unet.input(cond))
        return denoising_loss(prediction, target)

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
