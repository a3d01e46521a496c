"""Anchor generation with an OpenAI chat model through structured output.

STEREO (Srivatsan et al., CVPR 2025, Sec. 3.2 / supplementary) asks an LLM (GPT-4) for many
short, diverse prompts that contain the concept in a benign context; REO keeps those contexts
while erasing the concept. Replies are parsed into a pydantic schema, validated
(`concepts.validate_anchors`), and the model is asked again until enough valid anchors exist.

The API key is never read, stored, logged or written by this module: the `openai` client
finds it in OPENAI_API_KEY itself, and is built lazily because `OpenAI()` raises without one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pydantic

from stereo.anchors.concepts import AnchorRules, Concept, resolve_concept, validate_anchors

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TEMPLATE",
    "AnchorGenerationError",
    "AnchorGenerator",
    "AnchorList",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gpt-4o-2024-08-06"

DEFAULT_TEMPLATE = """\
You write prompts for a text-to-image model. We are removing the concept "{concept}" from the \
model, and we want to keep everything around it intact. Write {n} different prompts that each \
name "{concept}" explicitly and place it in a benign, ordinary context.

Rules:
- Each prompt is one short scene description of 5 to 20 words, in plain English.
- Every prompt must name "{concept}" itself (or a plain synonym of it).
- Vary the setting (indoors, outdoors, city, nature, historical, everyday), the medium \
(photograph, oil painting, sketch, watercolour, sculpture, film still), the activity and the \
composition (close-up, wide shot, from above, at night).
- Nothing sexual, violent or hateful; no real people's names; no numbering or quotes.
Return the prompts as a JSON object with a list of strings under "prompts"."""


class AnchorList(pydantic.BaseModel):
    """Structured-output schema of one reply."""

    prompts: list[str]


class AnchorGenerationError(RuntimeError):
    """The LLM did not deliver a valid anchor set within the allowed requests."""


class _MalformedReply(Exception):
    """A reply that parsed as HTTP but not as an anchor list (retried like a transient error)."""


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors worth retrying: rate limits (429), timeouts/connection drops, 5xx, bad replies."""
    import openai

    return (
        openai.RateLimitError,
        openai.APIConnectionError,  # includes APITimeoutError
        openai.InternalServerError,
        openai.LengthFinishReasonError,
        pydantic.ValidationError,  # reply was not JSON, or not the schema
        json.JSONDecodeError,
        _MalformedReply,
    )


@dataclass
class AnchorGenerator:
    """Generates anchors for a concept with `client.chat.completions.parse`.

    `client`: an `openai.OpenAI` (or compatible) client; None builds `openai.OpenAI()` on the
    first request, which reads OPENAI_API_KEY. Each request is tried `max_attempts` times with
    exponential backoff (`base_delay * 2**k`, capped at `max_delay`, waited with `sleep`); up
    to `max_requests` successful requests are made to collect `n` valid anchors.
    """

    model: str = DEFAULT_MODEL
    template: str = DEFAULT_TEMPLATE
    rules: AnchorRules = field(default_factory=AnchorRules)
    client: Any = field(default=None, repr=False)
    max_requests: int = 4
    max_attempts: int = 5
    base_delay: float = 2.0
    max_delay: float = 60.0
    temperature: float | None = None  # None: the server's default (some models accept no other)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def __post_init__(self):
        if self.max_requests < 1 or self.max_attempts < 1:
            raise ValueError(
                f"max_requests and max_attempts must be >= 1, got {self.max_requests}, "
                f"{self.max_attempts}"
            )
        try:
            self.template.format(concept="x", n=1)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"template must be a str.format string using only {{concept}} and {{n}} "
                f"(write literal braces as {{{{ }}}}); formatting failed with {err!r}"
            ) from err

    def generate(self, concept: str | Concept, n: int) -> list[str]:
        """Return exactly `n` valid, de-duplicated anchors for the concept."""
        concept = resolve_concept(concept) if isinstance(concept, str) else concept
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n (number of anchors) must be a positive integer, got {n!r}")
        anchors: list[str] = []
        for request in range(1, self.max_requests + 1):
            reply = self._request_with_retries(self._messages(concept, n - len(anchors), anchors))
            anchors, rejected = validate_anchors(anchors + reply, concept, self.rules)
            log.info(
                "anchors for %r: request %d/%d returned %d prompts, %d valid in total; rejected %s",
                concept.key, request, self.max_requests, len(reply), len(anchors), rejected or "none",
            )
            if len(anchors) >= n:
                return anchors[:n]
        raise AnchorGenerationError(
            f"only {len(anchors)} of {n} requested anchors for {concept.key!r} were valid after "
            f"{self.max_requests} requests to {self.model}. Ask for fewer (n=), allow more requests "
            "(max_requests=), relax the length bounds (rules=AnchorRules(...)), or revise the template."
        )

    def _messages(self, concept: Concept, n: int, have: list[str]) -> list[dict[str, str]]:
        messages = [{"role": "user", "content": self.template.format(concept=concept.text, n=n)}]
        if have:
            listed = "\n".join(have)
            messages.append({
                "role": "user",
                "content": f"These prompts already exist; write {n} new ones that differ from "
                f"them in setting and wording:\n{listed}",
            })
        return messages

    def _request_with_retries(self, messages: list[dict[str, str]]) -> list[str]:
        transient = _transient_errors()
        for attempt in range(self.max_attempts):
            try:
                return self._request(messages)
            except transient as err:
                if attempt + 1 == self.max_attempts:
                    raise AnchorGenerationError(
                        f"{self.model} failed {self.max_attempts} times in a row; last error: "
                        f"{type(err).__name__}: {_first_line(err)}. Check the model name and your "
                        "rate limits, or try again later."
                    ) from err
                delay = min(self.base_delay * 2**attempt, self.max_delay)
                log.warning(
                    "anchor request failed (%s: %s); retry %d/%d in %.1f s",
                    type(err).__name__, _first_line(err), attempt + 1, self.max_attempts - 1, delay,
                )
                self.sleep(delay)
        raise AssertionError("unreachable")

    def _request(self, messages: list[dict[str, str]]) -> list[str]:
        options = {} if self.temperature is None else {"temperature": self.temperature}
        completion = self._client().chat.completions.parse(
            model=self.model, messages=messages, response_format=AnchorList, **options
        )
        if not completion.choices:
            raise _MalformedReply("reply has no choices")
        message = completion.choices[0].message
        if message.parsed is None:
            refusal = getattr(message, "refusal", None)
            raise _MalformedReply(f"no structured content (refusal: {refusal!r})")
        return list(message.parsed.prompts)

    def _client(self):
        if self.client is None:
            from openai import OpenAI

            self.client = OpenAI()  # reads OPENAI_API_KEY; raises OpenAIError without one
        return self.client


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""
