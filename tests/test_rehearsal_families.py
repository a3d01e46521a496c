"""The README's STEREO command on every Stable Diffusion family, rehearsed on a tiny model of that family (issue 14).

`python train.py method=stereo model=<family> concept=nudity trainer=gpu` for sd15, sd21 (v-prediction) and sdxl
(two text towers, pooled embeddings, time ids), each with `model.pretrained=<tiny folder>` written by
`python -m stereo.models.families <family> DIR` (the family's real classes, scheduler and prediction type), bf16
frozen parts and CPU-sized budgets (`budget=rehearsal`). Then what a user does next: the export loads with the
family's own diffusers pipeline and generates, the STE token files load with `load_textual_inversion` (SDXL: the
clip_l/clip_g pair), and `evaluate.py` runs every attack on the base model and on the export.
"""

from __future__ import annotations

import pytest

from stereo.config import compose
from stereo.evaluation.config import compose_eval
from stereo.models.families import save_family_rehearsal
from stereo.recipes import train
from tests.scripts.rehearsal_checks import RESOLUTION, assert_export_loads, assert_grids, assert_token_loads, ste_tokens
from tests.test_rehearsal_eval import ATTACKS, BUDGETS

FAMILIES = ("sd15", "sd21", "sdxl")


def family_overrides(family: str, folder) -> list[str]:
    """`model=<family> trainer=gpu` as a user runs it, from the tiny folder through the real loading branch."""
    return [f"model={family}", f"model.pretrained={folder}", f"model.resolution={RESOLUTION}", "model.dtype=bf16",
            "trainer=gpu", "budget=rehearsal"]


@pytest.mark.parametrize("family", FAMILIES)
def test_stereo_then_every_attack_on_each_family(family, tmp_path, fresh_accelerate_state):
    from accelerate.state import AcceleratorState

    from stereo.evaluation.runner import evaluate

    base = save_family_rehearsal(family, tmp_path / family, seed=0)
    run = tmp_path / "run"
    out = train(compose([*family_overrides(family, base), "method=stereo", "concept=nudity", f"output_dir={run}"]))
    assert out["losses"] and all(loss == loss for loss in out["losses"])  # finite, not NaN
    assert (run / "config.yaml").is_file() and (run / "run.json").is_file()
    assert_grids(run)
    loaded = assert_export_loads(base, run / "export")
    assert {"unet", "delta"} <= set(loaded)
    tokens = ste_tokens(run)
    assert sorted({t["round"] for t in tokens}) == [0, 1]
    token_file = run / "ste" / tokens[-1]["file"]
    assert_token_loads(base, token_file)

    AcceleratorState._reset_state()  # evaluate.py is a new process
    report = evaluate(compose_eval([
        "concept=nudity", f"model@base={family}", f"base.pretrained={base}", f"base.resolution={RESOLUTION}",
        "base.dtype=bf16", f"attack=[{','.join(ATTACKS)}]", *BUDGETS, f"attacks.token_file.token_file={token_file}",
        f"+models.stereo.export={run / 'export'}", "generation.steps=2", "generation.max_prompts=2",
        "generation.batch_size=2", "progress=false", f"output_dir={tmp_path / 'eval'}"]))
    cells = {(r.model, r.attack): r for r in report.rows if r.kind == "concept"}
    assert {(m, a) for m in ("base", "stereo") for a in ATTACKS} <= set(cells), sorted(cells)
    assert all(row.n == 2 for row in cells.values())


def test_sdxl_defaults_fit_48_gb_and_the_user_can_still_choose():
    """model=sdxl selects conf/budget/sdxl.yaml: cross-attention only (STEREO ~33 GiB on SDXL's real shapes instead
    of ~50 GiB for noxattn); an explicit method.subset on the command line still wins."""
    default = compose(["method=stereo", "model=sdxl", "concept=nudity", "trainer=gpu"])
    assert default.method.subset == "xattn"
    assert compose(["method=stereo", "model=sdxl", "concept=nudity", "trainer=gpu",
                    "method.subset=noxattn"]).method.subset == "noxattn"
    assert compose(["method=stereo", "model=sd21", "concept=nudity", "trainer=gpu"]).method.subset is None
