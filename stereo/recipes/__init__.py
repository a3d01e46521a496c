"""The erasure recipes, one per `method.name`, each readable top to bottom as its paper's algorithm.

  esd     ESD (Gandikota et al. 2023): `recipes/esd.py`
  stereo  STEREO (Srivatsan et al. 2025): STE then REO, `recipes/stereo.py`
  reo     REO on the concept prompts alone, the no-search ablation: `recipes/stereo.py`

A recipe takes a `RunContext` (accelerator, base pipeline, output folder) and returns its outputs.
"""

from __future__ import annotations

from stereo.config import validate
from stereo.erasure.context import RunContext
from stereo.publish import push_export, require_token
from stereo.recipes import esd, stereo
from stereo.recipes.utility import utility_check

RECIPES = {"esd": esd.run_esd, "reo": stereo.run_reo_only, "stereo": stereo.run_stereo}


def train(cfg, detectors=None) -> dict:
    """Validate `cfg`, run the recipe of `cfg.method.name` and return its outputs (export folder, losses, ...),
    then the utility check on the concepts' neighbours (`detectors`: factories by name for this run only), then
    the upload of the export to `export.push_to_hub` (stereo.publish; the token is checked before training)."""
    validate(cfg)
    if cfg.export.push_to_hub:
        require_token()  # fail now, not after training
    if cfg.method.name not in RECIPES:
        raise ValueError(f"method.name={cfg.method.name!r} is not valid; choose one of {', '.join(RECIPES)}")
    with RunContext(cfg) as ctx:
        out = RECIPES[cfg.method.name](ctx)
        out["utility"] = utility_check(ctx, out.get("unet"), detectors)
        if cfg.export.push_to_hub and out.get("export_dir"):  # main process (the others have no export_dir)
            out["hub_url"] = push_export(out["export_dir"], cfg.export.push_to_hub, private=cfg.export.hub_private,
                                         revision=cfg.export.hub_revision)
        return out
