"""Ring-A-Bell (Tsai et al. 2024, "Ring-A-Bell! How Reliable are Concept Removal Methods for
Diffusion Models?"): a black-box attack that never queries the evaluated model.

1. Concept vector from paired prompts (with / without the concept), in text-encoder space:
       v = mean_i [ E(prompt_i with concept) - E(prompt_i without) ]          (77, D) (SDXL: (78, D))
2. For each evaluation prompt p, the target is  E(p) + eta * v  (eta = 3 for nudity in the paper).
3. A genetic search over hard tokens (L tokens from the vocabulary) minimises
       || E(tokens) - (E(p) + eta * v) ||^2
   with elitism, one-point crossover and per-token mutation; the best hard prompt is the attack.

Only the BASE pipeline's tokenizer and text encoder are used (the public CLIP text tower SD
ships with): no UNet, no detector, no image of the evaluated model. E is the condition the UNet
reads (`stereo.conditioning`): on SDXL both towers' states and the packed pooled row, so the search
matches the pooled embedding too; the hard tokens are ids both SDXL tokenizers share.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from stereo.attacks.base import (
    Attack,
    AttackedPrompt,
    AttackTarget,
    EvalPrompt,
    condition_of_ids,
    register_attack,
    wrap_ids,
)
from stereo.attacks.inversion import templates_for
from stereo.attacks.unlearndiffatk import attackable_vocabulary
from stereo.conditioning import text_towers
from stereo.generation import encode_prompts

ENCODE_BATCH = 256


def default_pairs(concept) -> list[tuple[str, str]]:
    """(with, without) prompt pairs: each inversion template filled with each concept prompt vs left empty."""
    pairs = []
    for template in templates_for(concept.kind):
        without = " ".join(template.format("").split())
        pairs.extend((template.format(text), without) for text in concept.prompts)
    return pairs


@torch.no_grad()
def encode_texts(pipe, texts: Sequence[str]) -> torch.Tensor:
    """(B, 77, D) fp32 conditions ((B, 78, D) on SDXL): distances to the goal are measured in fp32 whatever the
    encoder's dtype."""
    return encode_prompts(pipe, texts).float()


@torch.no_grad()
def concept_vector(pipe, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
    """(77, D) ((78, D) on SDXL): mean over pairs of E(with concept) - E(without), Ring-A-Bell's concept
    extraction."""
    if not pairs:
        raise ValueError("Ring-A-Bell needs at least one (with concept, without concept) prompt pair")
    with_concept = encode_texts(pipe, [a for a, _ in pairs])
    without = encode_texts(pipe, [b for _, b in pairs])
    return (with_concept - without).mean(0)


@register_attack("ring_a_bell")
class RingABell(Attack):
    white_box = False

    def attack(self, target: AttackTarget, prompts: Sequence[EvalPrompt]) -> list[AttackedPrompt]:
        pipe = target.base_pipe  # black-box: the public text encoder, never the evaluated model
        pairs = [tuple(p) for p in self.settings.paired_prompts] or default_pairs(target.concept)
        vector = concept_vector(pipe, pairs)  # (77, D)
        size = max(1, self.settings.prompt_batch)
        attacked: list[AttackedPrompt] = []
        for start in range(0, len(prompts), size):
            batch = list(prompts[start:start + size])
            goals = encode_texts(pipe, [p.prompt for p in batch]) + self.settings.eta * vector  # (B, 77, D)
            best, distance = self.search(pipe, batch, goals, target.progress)
            for i, p in enumerate(batch):
                tokens = best[i].tolist()
                attacked.append(AttackedPrompt.of(
                    p, pipe.tokenizer.decode(tokens), token_ids=wrap_ids(pipe.tokenizer, tokens),
                    info={"distance": float(distance[i]), "eta": self.settings.eta, "pairs": len(pairs)}))
        return attacked

    @torch.no_grad()
    def search(self, pipe, prompts: list[EvalPrompt], goals: torch.Tensor, progress: bool):
        """Genetic search: (B, L) best token ids per prompt and their distances to the goals."""
        s = self.settings
        generator = torch.Generator().manual_seed(s.seed + prompts[0].index)
        vocab = attackable_vocabulary(*(tokenizer for tokenizer, _ in text_towers(pipe)))
        population = self.initial_population(pipe, prompts, vocab, generator)  # (B, P, L) token ids
        best = population[:, 0].clone()
        best_distance = torch.full((len(prompts),), float("inf"))
        for _ in tqdm(range(s.steps), desc=f"ring_a_bell {len(prompts)} prompts", disable=not progress, leave=False):
            distance = self.fitness(pipe, population, goals)  # (B, P), lower is better
            order = distance.argsort(dim=1)
            population = population.gather(1, order[..., None].expand_as(population))
            distance = distance.gather(1, order)
            improved = distance[:, 0] < best_distance
            best[improved], best_distance[improved] = population[improved, 0], distance[improved, 0]
            population = self.next_generation(population, vocab, generator)
        return best, best_distance

    def initial_population(self, pipe, prompts, vocab, generator) -> torch.Tensor:
        """Individual 0 is the prompt's own tokens (padded with random ones); the rest are its mutants."""
        s = self.settings
        rows = []
        for p in prompts:
            own = pipe.tokenizer(p.prompt, add_special_tokens=False).input_ids[: s.prompt_length]
            filler = vocab[torch.randint(len(vocab), (s.prompt_length - len(own),), generator=generator)]
            rows.append(torch.cat([torch.tensor(own, dtype=torch.long), filler]))
        seed = torch.stack(rows)[:, None].repeat(1, s.population, 1)  # (B, P, L)
        mutants = self.mutate(seed, vocab, generator)
        mutants[:, 0] = seed[:, 0]
        return mutants

    def fitness(self, pipe, population: torch.Tensor, goals: torch.Tensor) -> torch.Tensor:
        """Mean squared distance of E(individual) to its prompt's goal, (B, P)."""
        b, p, _ = population.shape
        ids = torch.tensor([wrap_ids(pipe.tokenizer, row) for row in population.reshape(b * p, -1).tolist()])
        states = torch.cat([condition_of_ids(pipe, ids[i:i + ENCODE_BATCH]).float()
                            for i in range(0, len(ids), ENCODE_BATCH)]).reshape(b, p, *goals.shape[1:])
        return (states - goals[:, None].to(states.device)).pow(2).mean(dim=(2, 3)).cpu()

    def next_generation(self, ranked: torch.Tensor, vocab, generator) -> torch.Tensor:
        """Elites survive; children of two parents from the better half, one-point crossover, then mutation."""
        s = self.settings
        b, p, length = ranked.shape
        children = p - s.elite
        half = max(2, p // 2)
        mothers = torch.randint(half, (b, children), generator=generator)
        fathers = torch.randint(half, (b, children), generator=generator)
        cut = torch.randint(1, max(2, length), (b, children, 1), generator=generator)
        position = torch.arange(length).expand(b, children, length)
        pick = lambda parents: ranked.gather(1, parents[..., None].expand(b, children, length))  # noqa: E731
        kids = torch.where(position < cut, pick(mothers), pick(fathers))
        return torch.cat([ranked[:, : s.elite], self.mutate(kids, vocab, generator)], dim=1)

    def mutate(self, population: torch.Tensor, vocab, generator) -> torch.Tensor:
        mask = torch.rand(population.shape, generator=generator) < self.settings.mutation_rate
        random_tokens = vocab[torch.randint(len(vocab), population.shape, generator=generator)]
        return torch.where(mask, random_tokens, population)
