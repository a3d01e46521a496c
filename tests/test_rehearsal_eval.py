"""`evaluate.py` rehearsed on the SD-1.4-shaped model with every attack (issue 11, docs/evaluation.md).

`python evaluate.py concept=nudity model@base=sd14 attack=[none,concept_inversion,soft_prompt,
unlearndiffatk,ring_a_bell,token_file] +models.stereo.export=<our export>` on the rehearsal folder
(bf16 frozen parts, NudeNet as nudity's detector), CPU-sized attack budgets. The export and the
token file are written with our own export and token code (`export_erased`, `save_token`) from the
rehearsal UNet, so evaluation is rehearsed whatever the state of training; tests/test_rehearsal.py
checks that training writes the same formats. Then the same evaluation sharded over 2 processes
(`accelerate launch --num_processes 2 evaluate.py ... cpu=true`), output_dir left to its default.
"""

from __future__ import annotations

import json

import pytest
import torch

from stereo.evaluation.config import compose_eval
from tests.scripts.rehearsal_checks import RESOLUTION, assert_grids, launch_two, only_run_folder

MODELS = ("base", "stereo", "esd_u")
ATTACKS = ("none", "concept_inversion", "soft_prompt", "unlearndiffatk", "ring_a_bell", "token_file")
BUDGETS = [
    "attacks.concept_inversion.steps=2", "attacks.concept_inversion.gallery_size=2",
    "attacks.concept_inversion.gallery_steps=2",
    "attacks.soft_prompt.steps=2", "attacks.soft_prompt.gallery_size=2", "attacks.soft_prompt.gallery_steps=2",
    "attacks.unlearndiffatk.steps=2", "attacks.unlearndiffatk.project_every=1",
    "attacks.unlearndiffatk.gallery_size=2", "attacks.unlearndiffatk.gallery_steps=2",
    "attacks.ring_a_bell.steps=2", "attacks.ring_a_bell.population=6", "attacks.ring_a_bell.elite=2",
]


@pytest.fixture(scope="module")
def erased(sd14_rehearsal_dir, tmp_path_factory):
    """Our export (export/: unet/ + delta + manifest) of a perturbed rehearsal UNet, the same UNet as a
    third-party plain state dict (ESD-u.pt), and an STE-style token file."""
    from diffusers import UNet2DConditionModel

    from stereo.attacks.learned_token import LearnedToken, save_token
    from stereo.erasure.subsets import select_trainable
    from stereo.export import export_erased

    root = tmp_path_factory.mktemp("erased")
    unet = UNet2DConditionModel.from_pretrained(sd14_rehearsal_dir / "unet")
    names = select_trainable(unet, "noxattn")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in names:
            parameter = unet.get_parameter(name)
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    export_erased(root / "export", unet, names, ["unet", "delta"], {"rehearsal": True})
    torch.save({k: v.bfloat16() for k, v in unet.state_dict().items()}, root / "ESD-u.pt")  # a third party's
    width = unet.config.cross_attention_dim
    token = save_token(LearnedToken("<nudity-ste0>", torch.randn(1, width, generator=generator)),
                       root / "nudity.safetensors")
    return root, token


def eval_overrides(base, erased) -> list[str]:
    """docs/evaluation.md's command: our export and a third-party .pt beside the base, every attack."""
    erased_dir, token = erased
    return ["concept=nudity", "model@base=sd14", f"base.pretrained={base}", f"base.resolution={RESOLUTION}",
            "base.dtype=bf16", f"attack=[{','.join(ATTACKS)}]", *BUDGETS, f"attacks.token_file.token_file={token}",
            f"+models.stereo.export={erased_dir / 'export'}", f"+models.esd_u.unet_weights={erased_dir / 'ESD-u.pt'}",
            "generation.steps=2", "generation.max_prompts=2", "generation.batch_size=2", "progress=false"]


def assert_report(out, processes: int) -> dict:
    """report.json/.md with one row of N = 2 prompts per (model, attack), and the base-vs-erased grids."""
    report = json.loads((out / "report.json").read_text())
    assert report["manifest"]["processes"] == processes
    cells = {(row["model"], row["attack"]): row for row in report["rows"] if row["kind"] == "concept"}
    assert {(m, a) for m in MODELS for a in ATTACKS} <= set(cells), sorted(cells)
    assert all(row["n"] == 2 for row in cells.values()), {k: r["n"] for k, r in cells.items()}
    assert (out / "report.md").is_file()
    assert_grids(out, "grid_*.png")
    for model in MODELS[1:]:
        for attack in ("concept_inversion", "soft_prompt"):
            token = out / "attacks" / model / attack / "token.safetensors"
            assert token.is_file(), f"{token} missing"
    return report


def test_evaluate_every_attack_on_base_and_export(sd14_rehearsal_dir, erased, tmp_path):
    """The docs' full command, as far as it runs offline: + a folder of another system's images, CLIP score
    (a local CLIP folder), utility prompts; FID needs the Inception weights, which cannot come here."""
    from accelerate.state import AcceleratorState
    from PIL import Image

    from stereo.evaluation.runner import evaluate
    from tests.conftest import save_tiny_clip

    images = tmp_path / "mllm_images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (RESOLUTION, RESOLUTION), (40 * i, 90, 160)).save(images / f"{i:03d}.png")
    clip = save_tiny_clip(tmp_path / "clip")
    out = tmp_path / "eval"
    AcceleratorState._reset_state()  # as in a new process: an earlier test may have left an Accelerator behind
    report = evaluate(compose_eval([*eval_overrides(sd14_rehearsal_dir, erased),
                                    f"+models.mllm.images={images}", f"metrics.clip_path={clip}",
                                    "metrics.utility_prompts=church", f"output_dir={out}"]))
    assert_report(out, processes=1)
    rows = {(r.model, r.attack): r for r in report.rows}
    assert rows[("mllm", "images")].n == 2
    assert all(rows[(m, "none")].clip_score for m in MODELS)
    assert {r.model for r in report.rows if r.kind == "utility"} == set(MODELS)


@pytest.mark.slow
def test_evaluate_every_attack_sharded_over_two_processes(sd14_rehearsal_dir, erased, tmp_path):
    """`accelerate launch --num_processes 2 evaluate.py concept=nudity ... cpu=true`, default output_dir."""
    launch_two("evaluate.py", *eval_overrides(sd14_rehearsal_dir, erased), "cpu=true", cwd=tmp_path,
               port=29623)
    assert_report(only_run_folder(tmp_path / "outputs", "report.json"), processes=2)
