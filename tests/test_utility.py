"""The end-of-run utility check and what a run shows of the concepts it must keep (concepts.<key>.neighbours)."""

import json

import pytest
from PIL import Image

from stereo.evaluation.detectors import Detection, Detector
from stereo.evaluation.utility import NeighbourUtility, neighbour_detectors, neighbour_utility, summary_line
from stereo.recipes import train


class ColourDetector(Detector):
    """Flags images whose top-left pixel is the colour named by `concept` (red or blue)."""

    name = "colour"
    COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255)}

    def __init__(self, concept: str, threshold: float = 0.5):
        self.concept = concept

    def detect(self, images):
        flags = [im.getpixel((0, 0)) == self.COLOURS[self.concept] for im in images]
        return Detection(scores=[float(f) for f in flags], flags=flags)


def test_neighbour_utility_is_the_erased_rate_over_the_base_rate():
    red, blue = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))
    scorers = neighbour_detectors({"name": "colour", "concept": "green"}, ["red", "blue"], {"colour": ColourDetector})
    assert {name: d.concept for name, d in scorers.items()} == {"red": "red", "blue": "blue"}
    rows = neighbour_utility(scorers, {"red": [red, red, red, red], "blue": [blue, blue]},
                             {"red": [red, blue, red, blue], "blue": [blue, blue]})
    assert rows == [NeighbourUtility("red", 4, 4, 2), NeighbourUtility("blue", 2, 2, 2)]
    assert [r.kept for r in rows] == [0.5, 1.0]
    assert summary_line(rows, "colour").endswith("red 50% (2/4 vs 4/4), blue 100% (2/2 vs 2/2)")


def test_a_detector_without_a_concept_setting_cannot_score_neighbours():
    assert neighbour_detectors({"name": "nudenet", "threshold": 0.6}, ["person"]) is None


def test_a_toy_run_ends_with_the_utility_of_every_other_shape(fast_cfg, tmp_path):
    from stereo.toy.detector import ToyDetector

    out = train(fast_cfg("model=toy", "concept=circle", "trainer.steps=1", "utility_seeds=1"),
                detectors={"toy": ToyDetector})
    report = json.loads((tmp_path / "run" / "utility.json").read_text())
    assert [r["concept"] for r in report["rows"]] == ["square", "triangle", "star", "cross"]
    assert all(r["images"] == 3 for r in report["rows"])  # 3 prompts x 1 seed each
    assert out["utility"].startswith("utility of the other concepts") and "square" in out["utility"]


def test_sample_grids_show_the_neighbours_and_preservation_needs_something_to_keep(fast_cfg):
    from stereo.erasure.context import RunContext
    from stereo.erasure.previews import grid_prompts

    with RunContext(fast_cfg("concept=circle", "concepts.circle.prompts=[circle]")) as ctx:
        assert grid_prompts(ctx, ["adv"]) == ["circle", "adv", "a square", "a triangle", "a star", "a cross"]
        assert ctx.preservation() == {}
    cfg = fast_cfg("concept=church", "method.preserve.weight=1.0")
    cfg.concepts.church.neighbours = {}
    with pytest.raises(ValueError, match="nothing to preserve"):
        train(cfg)


def test_the_toy_default_preservation_regresses_four_kept_prompts_at_every_step(fast_cfg, monkeypatch):
    """The toy STEREO default's preservation (conf/tuned/toy_stereo.yaml: other layers, lambda 3, 4 kept prompts
    per latent, focus 2; named here so the test holds with or without `tuned`) on short budgets: every STE-erase
    and REO step adds lambda = 3 times the kept rows' focused MSE, 4 kept prompts per latent."""
    import stereo.erasure.trainer as trainer_module

    calls = []
    real = trainer_module.preservation_loss

    def spy(eps_student_keep, eps_teacher_keep, weight, focus):
        calls.append((eps_student_keep.shape[0], weight, focus))
        return real(eps_student_keep, eps_teacher_keep, weight, focus)

    monkeypatch.setattr(trainer_module, "preservation_loss", spy)
    out = train(fast_cfg("model=toy", "method=stereo", "concept=circle", "method.ste.rounds=1",
                         "method.ste.erase_steps=2", "method.ste.inversion.steps=2", "method.ste.gallery_size=2",
                         "method.reo.steps=3", "utility_seeds=0", "method.subset=noxattn",
                         "method.preserve.weight=3", "method.preserve.per_latent=4",
                         "method.preserve.focus=2"))
    assert calls == [(4, 3.0, 2.0)] * (2 + 3)
    assert (out["export_dir"] / "unet").is_dir()
