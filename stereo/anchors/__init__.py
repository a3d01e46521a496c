"""Anchors: the benign-context prompts STEREO's REO stage keeps intact while erasing a concept.

`get_anchors(concept, n)` returns a built-in set, a reviewed file, a cached LLM reply or a new
one (OpenAI structured output); see `stereo.anchors.sources`. CLI to generate and review a set:
`python -m stereo.anchors concept="garbage truck" n=100 out=garbage_truck.txt`.
"""

from stereo.anchors.cache import AnchorCache, AnchorRequest, default_cache_dir
from stereo.anchors.concepts import (
    CONCEPTS,
    AnchorRules,
    Concept,
    mentions_concept,
    rejection_reason,
    resolve_concept,
    validate_anchors,
)
from stereo.anchors.files import (
    builtin_anchor_path,
    builtin_concepts,
    load_anchor_file,
    load_builtin_anchors,
    write_anchor_file,
)
from stereo.anchors.generate import (
    DEFAULT_MODEL,
    DEFAULT_TEMPLATE,
    AnchorGenerationError,
    AnchorGenerator,
    AnchorList,
)
from stereo.anchors.sources import DEFAULT_N, SOURCES, get_anchors, reviewed_anchor_path

__all__ = [
    "CONCEPTS",
    "DEFAULT_MODEL",
    "DEFAULT_N",
    "DEFAULT_TEMPLATE",
    "SOURCES",
    "AnchorCache",
    "AnchorGenerationError",
    "AnchorGenerator",
    "AnchorList",
    "AnchorRequest",
    "AnchorRules",
    "Concept",
    "builtin_anchor_path",
    "builtin_concepts",
    "default_cache_dir",
    "get_anchors",
    "load_anchor_file",
    "load_builtin_anchors",
    "mentions_concept",
    "rejection_reason",
    "resolve_concept",
    "reviewed_anchor_path",
    "validate_anchors",
    "write_anchor_file",
]
