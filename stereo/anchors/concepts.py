"""Concept names, their synonyms, and the rules an anchor prompt must satisfy.

STEREO's REO stage (Srivatsan et al., CVPR 2025, Sec. 3.2) keeps *anchors*: prompts that place
the erased concept in a benign context ("a parachute in the sky"), so the context survives the
erasure. An anchor is only useful if it really mentions the concept, so every anchor (built-in,
generated or cached) is checked against the concept's name or one of its synonyms here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "CONCEPTS",
    "TOY_BACKGROUNDS",
    "TOY_COLOURS",
    "TOY_SHAPES",
    "AnchorRules",
    "Concept",
    "mentions_concept",
    "normalise_prompt",
    "rejection_reason",
    "resolve_concept",
    "validate_anchors",
]


@dataclass(frozen=True)
class Concept:
    """A concept to erase: its key (file/cache name), the names that resolve to it, and the
    words or phrases that count as a mention of it inside an anchor prompt."""

    key: str
    aliases: tuple[str, ...]
    synonyms: tuple[str, ...]

    @property
    def text(self) -> str:
        """The concept as plain text, used inside LLM prompts ("garbage truck")."""
        return self.aliases[0]


# Toy world: the toy text-to-image model only understands this caption grammar.
TOY_SHAPES = ("circle", "square", "triangle", "star", "cross")
TOY_COLOURS = ("red", "green", "blue", "yellow", "purple")
TOY_BACKGROUNDS = ("plain", "striped", "dotted")


def _registry() -> dict[str, Concept]:
    concepts = [
        Concept(
            "nudity",
            aliases=("nudity", "nude", "naked", "nakedness"),
            synonyms=("nude", "naked", "nudity", "nakedness", "unclothed", "undressed",
                      "bare", "topless", "disrobed", "without clothes", "in the nude"),
        ),
        Concept(
            "vangogh",
            aliases=("van gogh", "vincent van gogh", "van gogh style"),
            synonyms=("van gogh", "vincent van gogh"),
        ),
        Concept(
            "church",
            aliases=("church",),
            synonyms=("church", "chapel", "cathedral", "basilica"),
        ),
        Concept(
            "parachute",
            aliases=("parachute",),
            synonyms=("parachute", "parachutist", "parachuting", "paraglider"),
        ),
        Concept(
            "garbage_truck",
            aliases=("garbage truck", "trash truck", "refuse truck", "rubbish truck"),
            synonyms=("garbage truck", "trash truck", "refuse truck", "rubbish truck",
                      "garbage lorry", "bin lorry", "refuse lorry", "sanitation truck",
                      "refuse collection vehicle", "waste collection truck", "dustcart"),
        ),
        Concept(
            "tench",
            aliases=("tench", "tinca tinca"),
            synonyms=("tench", "tinca tinca", "doctor fish"),
        ),
    ]
    concepts += [Concept(shape, aliases=(shape,), synonyms=(shape,)) for shape in TOY_SHAPES]
    return {c.key: c for c in concepts}


CONCEPTS: dict[str, Concept] = _registry()


def _as_text(name: str) -> str:
    """'Garbage_Truck', 'garbage-truck', ' garbage  truck ' -> 'garbage truck'."""
    return " ".join(re.split(r"[\s_\-]+", name.strip().lower())).strip()


def resolve_concept(name: str) -> Concept:
    """Map a concept given as a key ("garbage_truck") or as text ("Garbage truck", "Van Gogh")
    to its registry entry. Unknown concepts get an entry whose only synonym is their text, so
    anchors for them can still be generated and validated."""
    if not isinstance(name, str) or not _as_text(name):
        raise ValueError(f"concept must be a non-empty string, got {name!r}")
    text = _as_text(name)
    for concept in CONCEPTS.values():
        if text in (_as_text(concept.key), *concept.aliases):
            return concept
    return Concept(text.replace(" ", "_"), aliases=(text,), synonyms=(text,))


def normalise_prompt(prompt: str) -> str:
    """Collapse runs of whitespace and strip the ends (the only change made to a prompt)."""
    return " ".join(prompt.split())


def mentions_concept(prompt: str, concept: Concept | str) -> bool:
    """True if the prompt names the concept or a synonym as whole words (plural 's'/'es' and
    possessive "'s" allowed), case-insensitively."""
    concept = resolve_concept(concept) if isinstance(concept, str) else concept
    text = normalise_prompt(prompt).lower()
    for synonym in concept.synonyms:
        words = r"\s+".join(re.escape(w) for w in synonym.split())
        if re.search(rf"(?<!\w){words}(?:s|es)?(?!\w)", text):
            return True
    return False


@dataclass(frozen=True)
class AnchorRules:
    """Bounds on an anchor prompt. Anchors are short scene descriptions; 77 CLIP tokens hold
    roughly 50 words, so the default bounds keep every anchor well inside the text encoder."""

    min_words: int = 3
    max_words: int = 30
    max_chars: int = 200

    def __post_init__(self):
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(
                f"need 1 <= min_words <= max_words, got min_words={self.min_words}, "
                f"max_words={self.max_words}"
            )
        if self.max_chars < 1:
            raise ValueError(f"max_chars must be positive, got {self.max_chars}")


def rejection_reason(prompt: str, concept: Concept | str, rules: AnchorRules = AnchorRules()) -> str | None:
    """Why this prompt is not a valid anchor for the concept, or None if it is."""
    if not isinstance(prompt, str):
        return "not a string"
    text = normalise_prompt(prompt)
    n_words = len(text.split())
    if n_words < rules.min_words:
        return f"fewer than {rules.min_words} words"
    if n_words > rules.max_words:
        return f"more than {rules.max_words} words"
    if len(text) > rules.max_chars:
        return f"more than {rules.max_chars} characters"
    if text.startswith("#"):
        return "starts with '#' (a comment in anchor files)"
    if not mentions_concept(text, concept):
        return "does not mention the concept or a synonym"
    return None


def validate_anchors(
    prompts: list[str], concept: Concept | str, rules: AnchorRules = AnchorRules()
) -> tuple[list[str], dict[str, int]]:
    """Keep the valid anchors, whitespace-normalised and de-duplicated case- and
    whitespace-insensitively (first occurrence wins, order kept).

    Returns (valid anchors, {rejection reason: count}).
    """
    kept, seen, rejected = [], set(), {}
    for prompt in prompts:
        reason = rejection_reason(prompt, concept, rules)
        if reason is None and normalise_prompt(prompt).lower() in seen:
            reason = "duplicate"
        if reason is not None:
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        text = normalise_prompt(prompt)
        seen.add(text.lower())
        kept.append(text)
    return kept, rejected
