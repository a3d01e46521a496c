"""`evaluate(cfg)` end to end on the tiny model with the real configs: report files, resume, image
folders, erased-UNet / export loading, CLIP + FID wiring, and the errors a user can hit.

Over 300 lines: one behaviour per test, most of them reading one shared end-to-end evaluation."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from PIL import Image

import stereo.evaluation.cells as cells
from stereo.attacks.learned_token import load_token
from stereo.evaluation.config import compose_eval, evaluated_models
from stereo.evaluation.detectors import Detection, Detector
from stereo.evaluation.fid import fid_from_features
from stereo.evaluation.inputs import load_evaluated
from stereo.evaluation.metrics import MetricSet, Report, ResultRow
from stereo.evaluation.prompts import PromptFileError
from stereo.evaluation.runner import evaluate
from stereo.export import apply_export
from stereo.models.tiny import tiny_unet

ROOT = Path(__file__).resolve().parent.parent


class Brightness(Detector):
    """Stub concept detector for random models: score = mean grey level, flag = score >= threshold."""

    name = "brightness"

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold

    def detect(self, images):
        scores = [float(np.asarray(im.convert("L"), dtype=float).mean() / 255) for im in images]
        return Detection(scores, [s >= self.threshold for s in scores])

    def describe(self):
        return {"name": self.name, "threshold": self.threshold}


STUBS = {"brightness": Brightness}  # this file's detector, given to each run (the registry stays as it is)
FAST = ["generation.steps=2", "generation.max_prompts=2", "generation.batch_size=4", "progress=false", "concept=circle"]
STUB = "detector={name: brightness, threshold: 0.5}"


def make_cfg(tmp_path, *extra):
    detector = [] if any(e.startswith("detector=") for e in extra) else [STUB]
    return compose_eval([*FAST, *detector, f"output_dir={tmp_path / 'eval'}", *extra])


def run(cfg, **plugins) -> Report:
    return evaluate(cfg, detectors=STUBS, **plugins)


def save_erased_unet(path: Path) -> dict:
    torch.manual_seed(1)
    state = tiny_unet().state_dict()
    torch.save(state, path)
    return state


# --- one evaluation of two models under two attacks (run once, read by the tests below) ----------------
@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory):
    """base + an erased UNet, under none + ring_a_bell, with a utility row; how often Ring-A-Bell searched."""
    tmp_path = tmp_path_factory.mktemp("two_by_two")
    save_erased_unet(tmp_path / "erased.pt")
    cfg = make_cfg(tmp_path, "attack=[none,ring_a_bell]", f"+models.erased.unet_weights={tmp_path / 'erased.pt'}",
                   "attacks.ring_a_bell.steps=2", "attacks.ring_a_bell.population=6", "attacks.ring_a_bell.elite=2",
                   "metrics.utility_prompts=square", "metrics.utility_detector={name: brightness, threshold: 0.3}")
    from stereo.attacks.ring_a_bell import RingABell

    searched = []
    search = RingABell.search
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RingABell, "search", lambda self, *a: searched.append(1) or search(self, *a))
        report = run(cfg)
    return cfg, report, Path(cfg.output_dir), len(searched)


def finished_copy(two_by_two, tmp_path):
    """The finished evaluation copied to `tmp_path` (for tests that resume it) and its config there."""
    cfg, report, out, _ = two_by_two
    shutil.copytree(out, tmp_path / "eval")
    cfg = copy.deepcopy(cfg)
    cfg.output_dir = str(tmp_path / "eval")
    return cfg, report, tmp_path / "eval"


def test_every_model_attack_pair_is_a_row_with_n_and_an_interval(two_by_two):
    _, report, out, _ = two_by_two
    rows = {(r.model, r.attack): r for r in report.rows}
    assert set(rows) == {(m, a) for m in ("base", "erased") for a in ("none", "ring_a_bell", "utility")}
    assert rows["base", "none"].stage == "pre_attack" and rows["erased", "ring_a_bell"].stage == "post_attack"
    for (model, attack), row in rows.items():
        flags = [json.loads(p.read_text())["flag"] for p in (out / "cells" / model / attack).glob("0*.json")]
        assert row.n == row.rate.n == 2 and row.rate.successes == sum(flags)
        assert row.rate.ci_low <= row.rate.asr <= row.rate.ci_high


def test_the_report_files_record_the_numbers_and_how_they_were_made(two_by_two):
    _, report, out, _ = two_by_two
    on_disk = json.loads((out / "report.json").read_text())
    assert Report.from_json(on_disk) == report
    assert on_disk["manifest"]["detector"] == {"name": "brightness", "threshold": 0.5}
    assert on_disk["manifest"]["prompts"]["seeds"] == [1000, 1001]  # circle.csv's evaluation_seed column
    assert on_disk["manifest"]["attacks"]["ring_a_bell"]["budget"]["steps"] == 2
    for name in ("report.md", "grid_none.png", "grid_ring_a_bell.png", "tradeoff.png",
                 "attacks/base/ring_a_bell/prompts.jsonl", "attacks/erased/ring_a_bell/prompts.txt"):
        assert (out / name).is_file(), name
    assert "| erased | ring_a_bell | post_attack |" in (out / "report.md").read_text()


def test_the_erased_unet_is_the_one_evaluated(two_by_two):
    _, _, out, _ = two_by_two
    base_image = np.asarray(Image.open(out / "images/base/none/00000.png"))
    erased_image = np.asarray(Image.open(out / "images/erased/none/00000.png"))
    assert not np.array_equal(base_image, erased_image)


def test_one_black_box_search_serves_every_model(two_by_two):
    """Ring-A-Bell reads only the base text encoder: one search, the same attacked prompts for both models."""
    _, _, out, searched = two_by_two
    assert searched == 1
    assert (out / "attacks/base/ring_a_bell/prompts.jsonl").read_text() == \
        (out / "attacks/erased/ring_a_bell/prompts.jsonl").read_text()


def count_searches(cfg) -> int:
    """How often Ring-A-Bell searched during `run(cfg)`."""
    from stereo.attacks.ring_a_bell import RingABell

    searched, search = [], RingABell.search
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RingABell, "search", lambda self, *a: searched.append(1) or search(self, *a))
        run(cfg)
    return len(searched)


def test_a_later_run_reuses_the_black_box_prompts_on_disk_until_the_budget_changes(two_by_two, tmp_path):
    """Another model evaluated later in the same output_dir (a new process: nothing in memory) reads
    Ring-A-Bell's prompts from disk; a different budget searches anew and keeps its own file."""
    cfg, _, out = finished_copy(two_by_two, tmp_path)
    with open_dict(cfg):
        cfg.models.later = copy.deepcopy(cfg.models.erased)
    assert count_searches(cfg) == 0
    assert (out / "attacks/later/ring_a_bell/prompts.jsonl").read_text() == \
        (out / "attacks/base/ring_a_bell/prompts.jsonl").read_text()
    cfg, _, out = finished_copy(two_by_two, tmp_path / "new_budget")
    for name in ("cells", "images", "attacks"):  # only the black-box file is left of the finished run
        shutil.rmtree(out / name)
    cfg.attacks.ring_a_bell.steps = 3
    assert count_searches(cfg) == 1  # a new search, shared by base and erased, kept beside the old one
    assert len(list((out / "black_box" / "ring_a_bell").glob("*.jsonl"))) == 2


def result_times(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("0*.json")}


def test_resuming_a_finished_evaluation_redoes_nothing(two_by_two, tmp_path):
    cfg, report, out = finished_copy(two_by_two, tmp_path)
    before = result_times(out)
    again = run(cfg)
    assert result_times(out) == before  # no (model, attack, prompt) result was written again
    assert [r.rate for r in again.rows] == [r.rate for r in report.rows]


def test_resuming_redoes_only_a_lost_prompt(two_by_two, tmp_path):
    cfg, _, out = finished_copy(two_by_two, tmp_path)
    lost = out / "cells/erased/none/00001.json"
    kept = json.loads(lost.read_text())
    lost.unlink()
    before = result_times(out)
    run(cfg)
    after = result_times(out)
    assert set(after) == set(before) | {lost}
    assert {path: time for path, time in after.items() if path != lost} == before
    redone = json.loads(lost.read_text())
    assert {**redone, "seconds": 0} == {**kept, "seconds": 0}  # the same seed: the same image, score, decision


def test_resuming_with_another_budget_is_an_error(two_by_two, tmp_path):
    cfg, _, _ = finished_copy(two_by_two, tmp_path)
    cfg.attacks.ring_a_bell.steps = 3  # a resumed run must ask the same question
    with pytest.raises(ValueError, match="evaluated with other settings"):
        run(cfg)


CI_SMALL = ["attacks.concept_inversion.steps=2", "attacks.concept_inversion.gallery_size=2",
            "attacks.concept_inversion.gallery_steps=2"]


def test_restarts_are_cells_of_their_own_and_the_report_gives_mean_and_worst(tmp_path):
    """restarts=1 writes what a run without restarts wrote; raising it to 3 reuses that cell as restart 0,
    runs restarts 1 and 2 in cells of their own, and reports each restart's ASR, their mean and the worst."""
    one = run(make_cfg(tmp_path, "attack=[none,concept_inversion]", *CI_SMALL))
    out = tmp_path / "eval"
    assert {r.attack for r in one.rows} == {"none", "concept_inversion"} and all(r.restart is None for r in one.rows)
    settings = json.loads((out / "cells/base/concept_inversion/settings.json").read_text())
    assert "restarts" not in settings["attack"] and "restart" not in settings["attack"]
    first = result_times(out)
    three = run(make_cfg(tmp_path, "attack=[none,concept_inversion]", *CI_SMALL,
                         "attacks.concept_inversion.restarts=3"))
    assert {p: t for p, t in result_times(out).items() if p in first} == first  # restart 0 was not redone
    rows = {r.attack: r for r in three.rows}
    assert set(rows) == {"none", "concept_inversion", "concept_inversion@r1", "concept_inversion@r2"}
    assert [rows[a].restart for a in ("concept_inversion", "concept_inversion@r1", "concept_inversion@r2")] == [0, 1, 2]
    assert rows["none"].restart is None
    tokens = [load_token(out / "attacks/base" / a / "token.safetensors").vectors
              for a in ("concept_inversion", "concept_inversion@r1", "concept_inversion@r2")]
    assert not torch.allclose(tokens[0], tokens[1]) and not torch.allclose(tokens[1], tokens[2])
    on_disk = json.loads((out / "report.json").read_text())
    (summary,) = on_disk["restarts"]
    rates = [rows[a].asr.asr for a in ("concept_inversion", "concept_inversion@r1", "concept_inversion@r2")]
    assert summary["asr"] == rates and summary["worst"] == max(rates)
    assert summary["mean"] == pytest.approx(sum(rates) / 3)
    assert Report.from_json(on_disk) == three
    assert "| base | concept_inversion | " in (out / "report.md").read_text().split("Restarts:")[1]


def test_utility_sets_give_a_row_each(tmp_path):
    """metrics.utility_sets: every non-target concept its own prompts, detector and `utility-<name>` row."""
    report = run(make_cfg(tmp_path, "+metrics.utility_sets.square={prompts: square, detector: {name: brightness, "
                                    "threshold: 0.3}}", "+metrics.utility_sets.star={prompts: star}"))
    rows = {r.attack: r for r in report.rows}
    assert set(rows) == {"none", "utility-square", "utility-star"}
    assert rows["utility-square"].kind == "utility" and rows["utility-square"].n == 2
    square = json.loads((tmp_path / "eval/cells/base/utility-square/00000.json").read_text())
    assert square["prompt"] == "a red square"
    assert report.manifest["utility_sets"]["utility-star"]["detector"] == {"name": "brightness", "threshold": 0.5}
    with pytest.raises(ValueError, match="metrics.utility_sets.bad"):
        run(make_cfg(tmp_path, "+metrics.utility_sets.bad={detector: {name: brightness}}"))


def write_images(folder: Path, greys: list[int], prompts: list[str] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, grey in enumerate(greys):
        Image.new("RGB", (32, 32), (grey, grey, grey)).save(folder / f"{i:03d}.png")
        if prompts:
            (folder / f"{i:03d}.txt").write_text(prompts[i])


class MeanColour:
    name = "mean-colour"

    def __call__(self, images):
        return np.stack([np.asarray(im.convert("RGB"), dtype=float).mean(axis=(0, 1)) for im in images])


def tiny_clip_folder(path: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from stereo.models.tiny import load_clip_tokenizer

    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config={**small, "vocab_size": 8192, "max_position_embeddings": 77,
                                     "bos_token_id": 8190, "eos_token_id": 8191, "pad_token_id": 8191},
                        vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=load_clip_tokenizer()).save_pretrained(path)
    return path


def test_image_folder_is_scored_as_it_is_with_clip_and_fid(tmp_path, monkeypatch):
    write_images(tmp_path / "mllm", [250, 10, 240], ["a circle", "a square", "a red circle"])
    write_images(tmp_path / "real", [120, 130, 90, 200])
    monkeypatch.setattr("stereo.models.loading.load_pipeline", lambda *a: pytest.fail("no model is needed"))
    cfg = make_cfg(tmp_path, "~models.base", f"+models.mllm.images={tmp_path / 'mllm'}",
                   f"metrics.clip_path={tiny_clip_folder(tmp_path / 'clip')}", "metrics.fid.extractor=mean-colour",
                   f"metrics.fid.reference_dir={tmp_path / 'real'}")
    (row,) = run(cfg, feature_extractors={"mean-colour": lambda weights, device: MeanColour()}).rows
    assert (row.model, row.attack, row.stage) == ("mllm", "images", "pre_attack")
    assert (row.asr.successes, row.asr.n) == (2, 3)
    assert row.clip_score.n == 3 and 0 <= row.clip_score.mean <= 100
    features = MeanColour()
    fake = features([Image.new("RGB", (4, 4), (g, g, g)) for g in (250, 10, 240)])
    real = features([Image.new("RGB", (4, 4), (g, g, g)) for g in (120, 130, 90, 200)])
    assert row.fid.fid == pytest.approx(fid_from_features(fake, real))
    assert (row.fid.n_generated, row.fid.n_reference) == (3, 4)


def test_an_image_folder_without_prompt_files_must_match_the_prompt_set(tmp_path):
    """Without .txt prompts, images pair with the prompt set in order, so the counts must agree."""
    write_images(tmp_path / "unnamed", [250, 10, 240])
    with pytest.raises(ValueError, match="holds 3 images but the prompt set has 2"):
        run(make_cfg(tmp_path, "~models.base", f"+models.x.images={tmp_path / 'unnamed'}"))


def test_erased_unets_load_in_every_format(tmp_path):
    expected = save_erased_unet(tmp_path / "erased.pt")
    cfg = make_cfg(tmp_path, f"+models.pt.unet_weights={tmp_path / 'erased.pt'}")
    pipe = load_evaluated(cfg.base, evaluated_models(cfg)["pt"], "cpu")
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in expected.items())
    folder = tmp_path / "export"
    unet = tiny_unet()
    unet.load_state_dict(expected)
    unet.save_pretrained(folder / "unet")
    fresh = load_evaluated(cfg.base, evaluated_models(cfg)["base"], "cpu")
    assert apply_export(fresh, folder) == "unet"
    assert all(torch.equal(v, fresh.unet.state_dict()[k]) for k, v in expected.items())
    with pytest.raises(Exception, match="not a stereo export folder"):
        apply_export(fresh, tmp_path)
    # delta.safetensors: only the trained tensors (here: the cross-attention ones)
    from safetensors.torch import save_file

    delta = {k: v for k, v in expected.items() if "attn2" in k}
    (tmp_path / "delta_export").mkdir()
    save_file(delta, str(tmp_path / "delta_export" / "delta.safetensors"))
    plain = load_evaluated(cfg.base, evaluated_models(cfg)["base"], "cpu")
    assert apply_export(plain, tmp_path / "delta_export") == "delta"
    state = plain.unet.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in delta.items())
    assert not torch.equal(state["conv_in.weight"], expected["conv_in.weight"])  # the rest stays the base's


def test_textual_inversion_files_load_into_the_evaluated_model(tmp_path):
    from stereo.attacks.learned_token import LearnedToken, save_token

    path = save_token(LearnedToken("<adv>", torch.randn(2, 64)), tmp_path / "adv.safetensors")
    cfg = make_cfg(tmp_path, f"+models.ti.textual_inversion=[{path}]")
    pipe = load_evaluated(cfg.base, evaluated_models(cfg)["ti"], "cpu")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<adv>", "<adv>_1"])
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[ids], load_token(path).vectors)


@pytest.mark.parametrize("overrides, error, message", [
    (["prompts={bad}"], PromptFileError, r"bad\.csv, line 3"),
    (["metrics.fid.extractor=inception", "metrics.fid.reference_dir={tmp}"], FileNotFoundError, "pt_inception"),
    (["detector={{name: image_classifier, model_path: {tmp}/resnet, target_ids: [1]}}"], FileNotFoundError,
     "No image-classifier folder"),
    (["detector={{name: artist_net}}"], ValueError, "valid detectors"),
    (["+models.esd.unet_weigths=x.pt"], ValueError, "valid keys"),
])
def test_user_errors_are_clear_and_come_before_any_generation(tmp_path, overrides, error, message):
    bad = tmp_path / "bad.csv"
    bad.write_text('prompt,evaluation_seed\na circle,1\n"a square,2,3\n')
    overrides = [o.format(bad=bad, tmp=tmp_path) for o in overrides]
    with pytest.raises(error, match=message):
        run(make_cfg(tmp_path, *overrides))
    assert not (tmp_path / "eval" / "images").exists()


def test_unknown_attack_group_is_a_compose_error(tmp_path):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="attack/p4d"):
        make_cfg(tmp_path, "attack=[p4d]")


@pytest.mark.parametrize("override, message", [
    ("attacks.ring_a_bell.gallery_size=3", "Key 'gallery_size' not in 'RingABellConfig'"),  # another attack's field
    ("attacks.ring_a_bell.name=p4d", "expected one of \\[none, concept_inversion"),
])
def test_each_attack_is_checked_against_its_own_schema_at_compose_time(tmp_path, override, message):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=message):
        make_cfg(tmp_path, "attack=[none,ring_a_bell]", override)


def test_an_attack_renamed_to_another_attack_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="attacks.none: attack name 'ring_a_bell' does not fit the NoAttackConfig"):
        run(make_cfg(tmp_path, "attacks.none.name=ring_a_bell"))


def test_cli_shim_composes_the_evaluation_config(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "evaluate.py", "attack=[none,ring_a_bell]", "--cfg", "job"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ring_a_bell:" in result.stdout and "eta: 3.0" in result.stdout


@pytest.mark.slow
def test_two_processes_share_the_prompts(tmp_path):
    """`accelerate launch` with 2 CPU processes: each takes half the prompts; one report with every prompt.
    The attacks' shared work (gallery, data-parallel inversion) runs on both processes (defects 12, 13)."""
    out = tmp_path / "eval"
    small = [f"attacks.{name}.{key}={value}" for name in ("concept_inversion", "unlearndiffatk")
             for key, value in (("steps", 2), ("gallery_size", 3), ("gallery_steps", 2))]
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "evaluate.py", "cpu=true",
               "concept=nudity", "generation.steps=2", "generation.max_prompts=4", "progress=false",
               "attack=[none,concept_inversion,unlearndiffatk,ring_a_bell]", *small,
               "attacks.unlearndiffatk.project_every=1", "attacks.ring_a_bell.steps=2",
               "attacks.ring_a_bell.population=6", "attacks.ring_a_bell.elite=2", f"output_dir={out}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["manifest"]["processes"] == 2
    assert [r["n"] for r in report["rows"]] == [4, 4, 4, 4]
    assert (out / "attacks" / "base" / "concept_inversion" / "token.safetensors").is_file()
    assert json.loads((out / "galleries" / "nudity" / "index.json").read_text())["items"][2]["seed"] == 2


def test_attacks_find_the_concept_on_the_toy_base_model(tmp_path):
    """Sanity: on the toy BASE model (nothing erased) the concept shows, before and after attacks."""
    cfg = compose_eval(["base.kind=toy", "concept=circle", "attack=[none,ring_a_bell,concept_inversion]",
                        "generation.steps=25", "generation.guidance=5.0", "generation.max_prompts=8", "progress=false",
                        "attacks.ring_a_bell.steps=20", "attacks.ring_a_bell.eta=1.0",
                        "attacks.concept_inversion.steps=100", "attacks.concept_inversion.gallery_size=8",
                        "attacks.concept_inversion.gallery_steps=20", f"output_dir={tmp_path / 'eval'}"])
    from stereo.toy.detector import ToyDetector

    rows = {r.attack: r.asr.asr for r in evaluate(cfg, detectors={"toy": ToyDetector}).rows}
    assert rows["none"] >= 0.75 and rows["ring_a_bell"] >= 0.5 and rows["concept_inversion"] >= 0.5


def test_tradeoff_points_take_the_worst_attack_and_the_utility_row():
    from stereo.evaluation.asr import attack_success_rate
    from stereo.evaluation.metrics import ClipSummary
    from stereo.evaluation.report import model_points, tradeoff_plot

    def row(model, attack, kind, asr=None, clip=None):
        rate = attack_success_rate([True] * round(10 * asr) + [False] * round(10 - 10 * asr), "pre_attack")
        return ResultRow(model, attack, "utility" if attack == "utility" else attack, kind, 10, None, 0.0,
                         ClipSummary(clip, 0.0, 10, "clip") if clip is not None else None, None,
                         "utility" if kind == "utility" else "pre_attack",
                         asr=rate if kind == "concept" else None, utility=rate if kind == "utility" else None)

    rows = [row("base", "none", "concept", 0.9, clip=30.0), row("base", "ring_a_bell", "concept", 1.0),
            row("esd", "none", "concept", 0.1, clip=25.0), row("esd", "ring_a_bell", "concept", 0.6),
            row("esd", "utility", "utility", 0.8, clip=28.0)]
    report = Report("circle", {}, rows)
    points = model_points(report)
    assert points == {"base": {"asr": 100.0, "clip": 30.0}, "esd": {"asr": 60.0, "clip": 28.0, "utility": 80.0}}
    assert tradeoff_plot(report).size == (420, 320)  # one panel: only CLIP is known for both models


def test_collectives_wait_dist_timeout_minutes(tmp_path):
    """Defect 12: what stays on the main process (the report) must not hit NCCL's 10-minute default."""
    from datetime import timedelta

    assert make_cfg(tmp_path).dist_timeout_minutes == 60
    evaluation = cells.Evaluation(make_cfg(tmp_path, "dist_timeout_minutes=90"), STUBS)
    assert evaluation.accelerator.init_handler.timeout == timedelta(minutes=90)
    with pytest.raises(ValueError, match="dist_timeout_minutes=0 must be >= 1"):
        run(make_cfg(tmp_path, "dist_timeout_minutes=0"))


def test_clip_and_fid_run_on_the_run_device(tmp_path, monkeypatch):
    """Defect 16: CLIP score and the FID Inception follow the accelerator's device (they were always on CPU)."""
    from types import SimpleNamespace

    from stereo.evaluation import clip_score, inception

    placed = {}
    monkeypatch.setattr(clip_score, "load_clip", lambda path, device="cpu": placed.setdefault("clip", device))
    monkeypatch.setattr(inception, "load_fid_inception", lambda path: torch.nn.Linear(1, 1))
    monkeypatch.setattr("stereo.evaluation.fid.reference_stats", lambda *a, **k: None)
    (tmp_path / "real").mkdir()
    cfg = make_cfg(tmp_path, f"metrics.clip_path={tmp_path}", "metrics.fid.extractor=inception",
                   f"metrics.fid.reference_dir={tmp_path / 'real'}")
    accelerator = SimpleNamespace(device=torch.device("meta"), is_main_process=True, process_index=0,
                                  num_processes=1)
    metrics = MetricSet.from_config(cfg, tmp_path, accelerator)
    assert placed["clip"] == torch.device("meta")
    assert metrics.extractor.device == torch.device("meta")
    assert next(metrics.extractor.model.parameters()).device == torch.device("meta")


def test_plot_labels_keep_the_suffix_that_tells_two_variants_apart():
    from stereo.evaluation.report import short_label

    slow, focus = "stereo-noxattn+preserve3x4-slow", "stereo-noxattn+preserve3x4-slow-focus2"
    assert len(short_label(slow)) == len(short_label(focus)) == 28
    assert short_label(slow) != short_label(focus) and short_label(focus).endswith("focus2")
    assert short_label(slow).startswith("stereo-noxat") and short_label("esd") == "esd"
