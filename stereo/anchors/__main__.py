"""Generate (or load) an anchor set and print it for review, one prompt per line.

    python -m stereo.anchors concept="garbage truck" n=100 [model=...] [source=auto|builtin|file|cache|openai]
                             [out=FILE] [cache_dir=DIR] [anchors_file=FILE]

Progress goes to stderr, prompts to stdout; `out=` also writes them as a reviewed-anchor file
(with a '#' header saying where they came from).
"""

from __future__ import annotations

import datetime
import logging
import sys
from dataclasses import dataclass

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stereo.anchors.files import write_anchor_file
from stereo.anchors.generate import DEFAULT_MODEL, AnchorGenerator
from stereo.anchors.sources import get_anchors


@dataclass
class AnchorsCLIConfig:
    concept: str = "???"
    n: int | None = None
    source: str = "auto"
    model: str = DEFAULT_MODEL
    out: str | None = None
    cache_dir: str | None = None
    anchors_file: str | None = None


def parse_args(argv: list[str]) -> AnchorsCLIConfig:
    """key=value arguments checked against AnchorsCLIConfig (a typo fails with the valid keys)."""
    schema = OmegaConf.structured(AnchorsCLIConfig)
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.from_dotlist(argv))
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        keys = ", ".join(AnchorsCLIConfig.__dataclass_fields__)
        raise ValueError(f"bad arguments {argv}: {err}. Use key=value with keys: {keys}") from err


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    try:
        cfg = parse_args(argv)
        prompts = get_anchors(
            cfg.concept, cfg.n, cfg.source, cache_dir=cfg.cache_dir,
            anchors_file=cfg.anchors_file, generator=AnchorGenerator(model=cfg.model),
        )
    except (ValueError, LookupError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(prompts))
    if cfg.out:
        date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
        header = [
            f"anchors for concept {cfg.concept!r}: {len(prompts)} prompts",
            f"source={cfg.source} model={cfg.model} date={date}",
            "review before use: one prompt per line, '#' starts a comment",
        ]
        path = write_anchor_file(cfg.out, prompts, header)
        print(f"wrote {len(prompts)} anchors to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
