"""The end-of-run utility check: what else did the erasure take? (`utility_seeds` images per neighbour prompt)

Draws every neighbour prompt of the erased concepts (`concepts.<key>.neighbours`) from the base and the erased
UNet with the same seeds, scores them with the concept's detector and logs one line; `utility.json` keeps it.
"""

from __future__ import annotations

import logging

from stereo.erasure.context import RunContext
from stereo.erasure.previews import draw
from stereo.evaluation.utility import neighbour_detectors, neighbour_utility, summary_line
from stereo.manifest import write_json_atomic

log = logging.getLogger(__name__)


def utility_check(ctx: RunContext, unet, detectors=None) -> str | None:
    """The summary line (main process), or None when off, without neighbours or without a usable detector.

    `detectors`: detector factories by name for this run (e.g. the toy world's), on top of the registered ones.
    """
    seeds = list(range(ctx.cfg.utility_seeds))
    neighbours = ctx.neighbours()
    if not seeds or not neighbours or unet is None or not ctx.accelerator.is_main_process:
        return None
    detector_cfg = next(iter(ctx.cfg.concepts.values())).detector
    try:
        scorers = neighbour_detectors(detector_cfg, list(neighbours), detectors)
    except (ValueError, FileNotFoundError) as error:  # an unregistered or unavailable detector: no check
        log.info("no utility check: %s", error)
        return None
    if scorers is None:
        log.info("no utility check: detector %s cannot score other concepts", detector_cfg.get("name"))
        return None
    cases = [(name, prompt, seed) for name, prompts in neighbours.items() for prompt in prompts for seed in seeds]
    images = {}
    for which, model in (("base", ctx.base_unet), ("erased", unet)):
        drawn = draw(ctx, model, [p for _, p, _ in cases], [s for _, _, s in cases])
        images[which] = {name: [im for (n, _, _), im in zip(cases, drawn) if n == name] for name in neighbours}
    rows = neighbour_utility(scorers, images["base"], images["erased"])
    line = summary_line(rows, detector_cfg.get("name"))
    write_json_atomic(ctx.output_dir / "utility.json", {"seeds": seeds, "neighbours": neighbours,
                                                         "rows": [r.to_json() for r in rows]})
    log.info(line)
    return line
