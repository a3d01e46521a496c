"""benchmarks.toy_robustness: the protocol's presets, extra methods with overrides, the numbers of its table
computed from hand-made reports (worst case over attacks and restarts, paired differences, utility as % of the
base model), and (slow) the quick run end to end."""

from __future__ import annotations

import json

import pytest

from benchmarks import toy_robustness as bench
from stereo.evaluation.asr import attack_success_rate
from stereo.evaluation.metrics import Report, ResultRow


def test_tune_and_heldout_presets():
    tune, heldout = bench.parse_args(["--tune"]), bench.parse_args(["--heldout"])
    assert (tune.concepts, tune.seeds) == (["circle", "triangle"], [0, 1, 2])
    assert (heldout.concepts, heldout.seeds) == (["square", "star", "cross"], [10, 11, 12, 13, 14])
    assert heldout.restarts == 5 and heldout.prompts == 32
    assert heldout.labels == ["esd", "reo", "stereo", "stereo_reference"]
    assert bench.parse_args(["--heldout", "--seeds", "10"]).seeds == [10]  # explicit values win
    assert heldout.restarts_of == {"concept_inversion": 5, "soft_prompt": 5, "unlearndiffatk": 5}
    assert bench.parse_args(["--once", "unlearndiffatk"]).restarts_of["unlearndiffatk"] == 1
    with pytest.raises(SystemExit):
        bench.parse_args(["--once", "ring_a_bell"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--tune", "--heldout"])


def test_extra_methods_carry_their_overrides():
    method = bench.parse_method("stereo+preserve:method=stereo,method.preserve.weight=1.0,"
                                "method.preserve.prompts=[a square,a star]")
    assert method.label == "stereo+preserve"
    assert method.overrides == ("method=stereo", "method.preserve.weight=1.0",
                                "method.preserve.prompts=[a square,a star]", "~tuned")
    assert bench.parse_method("stereo:method.reo.steps=400").overrides == ("method=stereo", "method.reo.steps=400",
                                                                           "~tuned")
    assert bench.parse_method("default:method=stereo,tuned=toy_stereo").overrides == ("method=stereo",
                                                                                       "tuned=toy_stereo")
    with pytest.raises(ValueError, match="no method preset"):
        bench.parse_method("mine:trainer.steps=3")
    args = bench.parse_args(["--method", "stereo+preserve:method=stereo,method.preserve.weight=1.0"])
    assert args.labels[-1] == "stereo+preserve"


def rows_for(model: str, rates: dict[str, float], kept: dict[str, float]) -> list[ResultRow]:
    def row(attack, value, kind):
        n = 8
        result = attack_success_rate([True] * round(n * value) + [False] * (n - round(n * value)), "pre_attack")
        return ResultRow(model, attack, attack.split("@")[0] if kind == "concept" else "utility", kind, n, None, 0.0,
                         None, None, "utility" if kind == "utility" else "post_attack",
                         asr=result if kind == "concept" else None, utility=result if kind == "utility" else None)

    return [row(a, v, "concept") for a, v in rates.items()] + [row(f"utility-{s}", v, "utility")
                                                               for s, v in kept.items()]


def test_the_table_numbers_from_reports():
    args = bench.parse_args(["--concepts", "circle", "--seeds", "0,1", "--restarts", "2", "--methods", "esd,reo",
                             "--attacks", "none,concept_inversion,ring_a_bell"])
    shapes = {"square": 1.0, "triangle": 1.0, "star": 1.0, "cross": 0.5}  # base rates

    def models(seed):  # one training seed's erased models; the report holds the base model once
        esd = rows_for(f"esd_seed{seed}", {"none": 0.25, "concept_inversion": 0.75, "concept_inversion@r1": 1.0,
                                           "ring_a_bell": 0.5}, {**shapes, "square": 0.5})
        reo = rows_for(f"reo_seed{seed}", {"none": 0.0, "concept_inversion": 0.25,
                                           "concept_inversion@r1": 0.125 * seed, "ring_a_bell": 0.5},
                       {**shapes, "cross": 0.25})
        return esd + reo

    base = rows_for("base", {"none": 1, "concept_inversion": 1, "concept_inversion@r1": 1, "ring_a_bell": 1}, shapes)
    reports = {"circle": Report("circle", {}, base + [row for s in args.seeds for row in models(s)])}
    runs = {("circle", s, m): ("", 10.0) for s in args.seeds for m in args.labels}
    summary = bench.summarise_concept(args, reports, runs, "circle")
    esd, reo = summary["esd"], summary["reo"]
    assert esd["pre_attack"].estimate == 0.25
    assert esd["worst_attack"] == "concept_inversion" and esd["worst_case"].estimate == pytest.approx(0.875)
    assert reo["worst_attack"] == "ring_a_bell" and reo["worst_case"].estimate == pytest.approx(0.5)
    # restarts: concept inversion's mean over seeds x restarts, and the best restart per seed
    assert reo["attacks"]["concept_inversion"]["mean"].estimate == pytest.approx((0.25 * 2 + 0 + 0.125) / 4)
    assert reo["attacks"]["concept_inversion"]["best_of_restarts"] == pytest.approx(0.25)
    assert esd["vs"]["reo"].estimate == pytest.approx(0.375) and esd["vs"]["reo"].excludes(0)
    assert reo["vs"]["esd"].estimate == pytest.approx(-0.375)
    # utility: % of the base model's rate on every other shape, the least kept one
    assert esd["utility"]["square"].estimate == 0.5 and reo["utility"]["cross"].estimate == 0.5
    assert esd["utility_worst"].estimate == 0.5 and esd["utility"]["triangle"].estimate == 1.0
    table = bench.tables(args, {"circle": summary}, {})
    # ESD's restarts differ (75 %, 100 %): resampling them moves its worst case, its pre-attack ASR stays
    assert "| circle | esd | 25.0 [25.0, 25.0] | 87.5 [75.0, 100.0] (concept_inversion) | – | +37.5 [+25.0, +50.0] | " \
        "square 50.0 [50.0, 50.0], triangle 100.0 [100.0, 100.0]" in table
    assert bench.plot(args, {"circle": summary}, {}).size == (420, 320)
    # over several concepts (here the same numbers twice): the mean of their worst cases, the least-kept shape
    args.concepts = ["circle", "triangle"]
    pool = bench.pooled(args, {"circle": summary, "triangle": summary})
    assert pool["esd"]["worst_case"].estimate == pytest.approx(0.875)
    assert pool["esd"]["vs"]["reo"].estimate == pytest.approx(0.375)
    assert pool["reo"]["utility_worst"].estimate == 0.5 and pool["reo"]["utility_mean"].estimate == pytest.approx(7 / 8)
    assert "| esd | 87.5 [" in bench.tables(args, {"circle": summary, "triangle": summary}, pool)
    # --versus: the paired differences and their columns follow the chosen labels (here REO-only alone)
    versus = bench.parse_args(["--concepts", "circle", "--seeds", "0,1", "--restarts", "2", "--methods", "esd,reo",
                               "--attacks", "none,concept_inversion,ring_a_bell", "--versus", "reo"])
    only_reo = bench.summarise_concept(versus, reports, runs, "circle")
    assert set(only_reo["esd"]["vs"]) == {"reo"} and only_reo["reo"]["vs"] == {}
    assert only_reo["esd"]["vs"]["reo"].estimate == pytest.approx(0.375)
    head = bench.tables(versus, {"circle": only_reo}, {}).splitlines()[0]
    assert "Δ vs REO-only (pp)" in head and "Δ vs ESD" not in head


def test_a_finished_training_is_reused_only_while_the_configs_still_give_its_settings(tmp_path):
    """Same overrides are not enough: a budget or preset default changed since the training makes it stale. A
    config written before a setting existed is not refused for lacking that key."""
    from omegaconf import OmegaConf

    from stereo.config import compose

    overrides = ["model=toy", "method=esd", "concept=circle", "seed=0"]
    cfg = compose([*overrides, f"output_dir={tmp_path}"])
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))  # as a training writes it
    bench.check_finished(tmp_path, overrides, overrides, cfg)
    # recorded before conf/tuned/ existed: no `~tuned`, and the settings it gives are the same
    bench.check_finished(tmp_path, [*overrides, bench.PUBLISHED], overrides, cfg)
    with pytest.raises(ValueError, match="was trained with"):
        bench.check_finished(tmp_path, overrides, [*overrides[:-1], "seed=1"], cfg)
    now = compose([*overrides, "trainer.steps=7", "method.preserve.latents=own", f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="method.preserve.latents, trainer.steps differ"):
        bench.check_finished(tmp_path, overrides, overrides, now)
    older = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    del older["method"]["preserve"]["latents"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(older))
    assert bench.changed_settings(now, tmp_path / "config.yaml") == ["trainer.steps"]


@pytest.mark.slow
def test_quick_run_end_to_end_writes_restarts_intervals_and_paired_differences(tmp_path):
    """The benchmark's smoke command (its docstring) with two methods: train on the toy, evaluate every attack with
    2 restarts, and write .md / .json / .png with per-restart ASR, bootstrap intervals, the other shapes' utility
    and REO's paired difference to ESD (~2.5 min on 2 cores; CI runs it)."""
    from benchmarks.toy_robustness import main

    main(["--concepts", "circle", "--seeds", "0", "--quick", "--restarts", "2", "--methods", "esd,reo",
          "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results")])
    results = json.loads((tmp_path / "results" / "toy_robustness_quick.json").read_text())
    assert results["command"].startswith("python -m benchmarks.toy_robustness") and results["torch_threads"] >= 1
    circle = results["concepts"]["circle"]
    assert set(circle) == {"base", "esd", "reo"}
    for method in ("esd", "reo"):
        row = circle[method]
        for attack in ("concept_inversion", "soft_prompt", "unlearndiffatk"):
            summary = row["attacks"][attack]
            assert len(summary["per_restart"]) == 2 and summary["mean"]["n_restarts"] == 2
            assert summary["mean"]["low"] <= summary["mean"]["estimate"] <= summary["mean"]["high"]
        assert row["worst_attack"] in ("none", "concept_inversion", "soft_prompt", "unlearndiffatk", "ring_a_bell")
        assert set(row["utility"]) == {"square", "triangle", "star", "cross"}
    difference = circle["reo"]["vs"]["esd"]
    assert difference["low"] <= difference["estimate"] <= difference["high"]
    assert (tmp_path / "results" / "toy_robustness_quick.md").read_text().count("| circle |") >= 2
    assert (tmp_path / "results" / "toy_robustness_quick.png").is_file()


@pytest.mark.slow
def test_ste_replay_plays_each_round_token_on_base_rounds_and_export(tmp_path):
    """benchmarks.ste_replay on quick STEREO trainings (one with two tokens per round): every token STE found
    against the base model, each round's erased UNet (its saved subset, not the export's, and that run's,
    not another variant's on the same --work) and the final export (~1.5 min on 2 cores)."""
    from safetensors.torch import load_file

    from benchmarks import ste_replay

    work = tmp_path / "work"
    bench.train_all(bench.parse_args(["--concepts", "circle", "--seeds", "0", "--methods", "", "--quick",
                                      "--method", "stereo:method.ste.tokens_per_round=2",
                                      "--method", "other:method=stereo,method.ste.erase_lr=0.01",
                                      "--work", str(work)]), work)
    for label, tokens in (("stereo", ("token0", "token0-1")), ("other", ("token0",))):
        run = work / "train" / "circle" / "seed0" / label
        ste_replay.main(["--work", str(work), "--concepts", "circle", "--seeds", "0", "--prompts", "4",
                         "--steps", "5", "--label", label, "--results", str(tmp_path / "results")])
        replay = json.loads((tmp_path / "results" / "ste_replay.json").read_text())["replay"]["circle"]
        assert set(replay) == set(tokens) and set(replay["token0"]) == {"base", "round0", "final"}
        assert all(0 <= cell["per_seed"][0] <= 1 for token in replay.values() for cell in token.values())
        # the round's model is this run's round's erased subset, and the attack replays that round's token file
        folder = work / "replay" / label / "circle" / "seed0"
        loaded = load_file(folder / "unets" / "round_0" / "delta.safetensors")
        saved = load_file(run / "ste" / "round_0" / "unet_delta.safetensors")
        assert loaded.keys() == saved.keys() and all((loaded[k] == saved[k]).all() for k in saved)
        found = json.loads((run / "ste" / "round_0" / "done.json").read_text())["tokens"]
        for j, name in enumerate(tokens):
            replayed = folder / name / "attacks" / "round0" / "token_file" / "prompts.jsonl"
            assert json.loads(replayed.read_text().splitlines()[0])["info"]["token"] == found[j]["token"]
    assert "| circle | token0 |" in (tmp_path / "results" / "ste_replay.md").read_text()
