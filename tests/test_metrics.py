"""FID (maths, statistics caching, the FID Inception network), CLIP score and ASR.

Over 300 lines: the three metrics' maths, each checked against a reference computation."""

import hashlib
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from stereo.evaluation.asr import attack_success_rate, wilson_interval
from stereo.evaluation.clip_score import clip_score, load_clip
from stereo.evaluation.detectors import Detection
from stereo.evaluation.fid import (
    FeatureStats,
    compute_fid,
    extract_features,
    fid_from_features,
    frechet_distance,
    reference_stats,
)
from stereo.evaluation.inception import (
    CONFIG_KEY,
    FID_WEIGHTS_SHA256,
    FIDInceptionV3,
    InceptionFeatureExtractor,
    load_fid_inception,
)
from tests.conftest import save_tiny_clip


# --- FID maths --------------------------------------------------------------------------------
def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's general matrix square root, as pytorch-fid computes it."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def test_fid_matches_scipy_sqrtm_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16))
    b = rng.normal(loc=0.3, scale=1.5, size=(150, 16)) @ rng.normal(size=(16, 16))
    assert fid_from_features(a, b) == pytest.approx(scipy_fid(a, b), rel=1e-8)


def test_fid_of_a_set_with_itself_is_zero_even_when_rank_deficient():
    rng = np.random.default_rng(1)
    full = rng.normal(size=(300, 8))
    low_rank = rng.normal(size=(20, 3)) @ rng.normal(size=(3, 32))  # N < D: singular covariance
    assert fid_from_features(full, full) == pytest.approx(0.0, abs=1e-9)
    assert abs(fid_from_features(low_rank, low_rank)) < 1e-9


def test_fid_of_known_gaussians():
    # N(0, I) vs N(m, 4I) in D dims: |m|^2 + D + 4D - 2 * 2D = |m|^2 + D.
    d, m = 6, np.full(6, 0.5)
    a = FeatureStats(np.zeros(d), np.eye(d), 100)
    b = FeatureStats(m, 4 * np.eye(d), 100)
    assert frechet_distance(a, b) == pytest.approx(m @ m + d)


def test_fid_rejects_mismatched_dimensions_and_too_few_samples():
    a, b = FeatureStats(np.zeros(3), np.eye(3), 5), FeatureStats(np.zeros(4), np.eye(4), 5)
    with pytest.raises(ValueError, match="same feature extractor"):
        frechet_distance(a, b)
    with pytest.raises(ValueError, match="N >= 2"):
        fid_from_features(np.zeros((1, 3)), np.zeros((5, 3)))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_feature_stats_round_trip(tmp_path, suffix):
    stats = FeatureStats.from_features(np.random.default_rng(2).normal(size=(10, 4)))
    loaded = FeatureStats.load(stats.save(tmp_path / f"ref{suffix}"))
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_array_equal(loaded.cov, stats.cov)
    assert loaded.n == 10
    with pytest.raises(ValueError, match=r"\.npz"):
        stats.save(tmp_path / "ref.pkl")


class MeanColour:
    """A tiny FeatureExtractor: per-channel mean and std of the image."""

    name = "mean-colour"

    def __init__(self):
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        arrays = [np.asarray(im, dtype=np.float64) / 255 for im in images]
        return np.stack([np.concatenate([a.mean((0, 1)), a.std((0, 1))]) for a in arrays])


def noisy_images(n, seed, size=8):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_reference_stats_are_cached_by_extractor_and_files(tmp_path):
    paths = []
    for i, image in enumerate(noisy_images(7, seed=3)):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    extractor = MeanColour()
    first = reference_stats(paths, extractor, cache_dir=tmp_path / "cache", batch_size=3)
    calls = extractor.calls
    assert calls == 3 and first.n == 7  # batches of 3, 3, 1
    second = reference_stats(paths, extractor, cache_dir=tmp_path / "cache")
    assert extractor.calls == calls  # served from the cache
    np.testing.assert_allclose(second.cov, first.cov)
    noisy_images(1, seed=4)[0].save(paths[0])  # a changed file is a different reference set
    reference_stats(paths, extractor, cache_dir=tmp_path / "cache")
    assert extractor.calls > calls


def test_compute_fid_report_names_n_and_implementation():
    extractor = MeanColour()
    reference = FeatureStats.from_features(extract_features(noisy_images(12, seed=5), extractor))
    report = compute_fid(noisy_images(9, seed=6), reference, extractor, batch_size=4)
    assert report["n_generated"] == 9 and report["n_reference"] == 12
    assert report["extractor"] == "mean-colour" and "stereo-fid" in report["implementation"]
    assert report["fid"] >= 0


# --- FID Inception network --------------------------------------------------------------------
def _conv(prefix, out_ch, in_ch, kh, kw):
    return {f"{prefix}.conv.weight": (out_ch, in_ch, kh, kw), f"{prefix}.bn.weight": (out_ch,),
            f"{prefix}.bn.bias": (out_ch,), f"{prefix}.bn.running_mean": (out_ch,),
            f"{prefix}.bn.running_var": (out_ch,)}


def _block(prefix, convs):
    keys = {}
    for name, shape in convs.items():
        keys.update(_conv(f"{prefix}.{name}", *shape))
    return keys


def pt_inception_layout() -> dict[str, tuple]:
    """Key -> shape of pt_inception-2015-12-05-6726825d.pth (torchvision Inception3 names,
    aux_logits=False, 1008 classes), written out from the architecture, not from our module."""
    keys = {}
    for name, shape in {"Conv2d_1a_3x3": (32, 3, 3, 3), "Conv2d_2a_3x3": (32, 32, 3, 3),
                        "Conv2d_2b_3x3": (64, 32, 3, 3), "Conv2d_3b_1x1": (80, 64, 1, 1),
                        "Conv2d_4a_3x3": (192, 80, 3, 3)}.items():
        keys.update(_conv(name, *shape))
    for name, cin, pool in [("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)]:
        keys.update(_block(name, {
            "branch1x1": (64, cin, 1, 1), "branch5x5_1": (48, cin, 1, 1), "branch5x5_2": (64, 48, 5, 5),
            "branch3x3dbl_1": (64, cin, 1, 1), "branch3x3dbl_2": (96, 64, 3, 3),
            "branch3x3dbl_3": (96, 96, 3, 3), "branch_pool": (pool, cin, 1, 1)}))
    keys.update(_block("Mixed_6a", {
        "branch3x3": (384, 288, 3, 3), "branch3x3dbl_1": (64, 288, 1, 1),
        "branch3x3dbl_2": (96, 64, 3, 3), "branch3x3dbl_3": (96, 96, 3, 3)}))
    for name, c7 in [("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)]:
        keys.update(_block(name, {
            "branch1x1": (192, 768, 1, 1), "branch7x7_1": (c7, 768, 1, 1), "branch7x7_2": (c7, c7, 1, 7),
            "branch7x7_3": (192, c7, 7, 1), "branch7x7dbl_1": (c7, 768, 1, 1),
            "branch7x7dbl_2": (c7, c7, 7, 1), "branch7x7dbl_3": (c7, c7, 1, 7),
            "branch7x7dbl_4": (c7, c7, 7, 1), "branch7x7dbl_5": (192, c7, 1, 7),
            "branch_pool": (192, 768, 1, 1)}))
    keys.update(_block("Mixed_7a", {
        "branch3x3_1": (192, 768, 1, 1), "branch3x3_2": (320, 192, 3, 3),
        "branch7x7x3_1": (192, 768, 1, 1), "branch7x7x3_2": (192, 192, 1, 7),
        "branch7x7x3_3": (192, 192, 7, 1), "branch7x7x3_4": (192, 192, 3, 3)}))
    for name, cin in [("Mixed_7b", 1280), ("Mixed_7c", 2048)]:
        keys.update(_block(name, {
            "branch1x1": (320, cin, 1, 1), "branch3x3_1": (384, cin, 1, 1),
            "branch3x3_2a": (384, 384, 1, 3), "branch3x3_2b": (384, 384, 3, 1),
            "branch3x3dbl_1": (448, cin, 1, 1), "branch3x3dbl_2": (384, 448, 3, 3),
            "branch3x3dbl_3a": (384, 384, 1, 3), "branch3x3dbl_3b": (384, 384, 3, 1),
            "branch_pool": (192, cin, 1, 1)}))
    keys.update({"fc.weight": (1008, 2048), "fc.bias": (1008,)})
    return keys


@pytest.fixture(scope="module")
def inception():
    torch.manual_seed(0)
    return FIDInceptionV3().eval()


def test_inception_state_dict_matches_pt_inception_layout(inception):
    ours = {k: tuple(v.shape) for k, v in inception.state_dict().items()
            if not k.endswith("num_batches_tracked")}
    expected = pt_inception_layout()
    assert len(expected) == 94 * 5 + 2
    assert ours == expected


def test_inception_features_shape_and_preprocessing(inception):
    extractor = InceptionFeatureExtractor(inception)
    images = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (48, 40), (0, 0, 255))]
    features = extractor(images)
    assert features.shape == (2, 2048) and features.dtype == np.float64
    assert np.isfinite(features).all() and not np.allclose(features[0], features[1])
    scaled = FIDInceptionV3.preprocess(torch.ones(1, 3, 10, 20))
    assert scaled.shape == (1, 3, 299, 299) and torch.allclose(scaled, torch.ones_like(scaled))  # 1 -> 1


def test_inception_missing_weights_error_says_what_and_where(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_fid_inception(tmp_path / "nope.pth")
    message = str(error.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in message and FID_WEIGHTS_SHA256 in message
    assert CONFIG_KEY in message and "nope.pth" in message
    with pytest.raises(FileNotFoundError, match=CONFIG_KEY):
        InceptionFeatureExtractor.from_file(None)


def test_inception_wrong_hash_is_rejected(tmp_path):
    bad = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    bad.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match=f"sha256 {hashlib.sha256(b'not the weights').hexdigest()}"):
        load_fid_inception(bad)


def test_inception_loads_a_checkpoint_without_batch_counters(tmp_path, inception):
    # The real file is not here, so: save our random network the way the checkpoint is laid out
    # and load it through the same code path, with that file's hash as the expected one.
    state = {k: v for k, v in inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["Mixed_7c.branch_pool.bn.running_mean"] = torch.randn(192)
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    loaded = load_fid_inception(path, expected_sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    torch.testing.assert_close(
        loaded.Mixed_7c.branch_pool.bn.running_mean, state["Mixed_7c.branch_pool.bn.running_mean"]
    )
    assert not loaded.training
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, path)
    with pytest.raises(ValueError, match="missing keys"):
        load_fid_inception(path, expected_sha256=hashlib.sha256(path.read_bytes()).hexdigest())


# --- CLIP score -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), seed=0)


def manual_clip_scores(folder, images, prompts):
    model, processor = load_clip(folder)
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        tokens = processor.tokenizer(prompts, padding=True, return_tensors="pt")
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(model.text_model(**tokens).pooler_output)
    cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    return [100 * max(c, 0.0) for c in cosine.tolist()], cosine.tolist()


def test_clip_score_equals_manual_cosine(tiny_clip_dir):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)) for _ in range(6)]
    prompts = ["a red circle", "a blue square", "a green star on a striped background",
               "a photo of a yellow cross", "purple", "a red circle and a blue square"]
    result = clip_score(images, prompts, tiny_clip_dir, batch_size=4)
    expected, raw = manual_clip_scores(tiny_clip_dir, images, prompts)
    np.testing.assert_allclose(result.per_image, expected, rtol=1e-4, atol=1e-4)
    assert result.n == 6 and result.mean == pytest.approx(np.mean(expected), abs=1e-4)
    assert result.std == pytest.approx(np.std(expected, ddof=1), abs=1e-4)
    if min(raw) < 0:  # random weights give some negative cosines: they must be clamped to 0
        assert min(result.per_image) == 0.0


def test_clip_score_errors(tiny_clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="No CLIP model folder"):
        clip_score([Image.new("RGB", (8, 8))], ["x"], tmp_path / "missing")
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score([Image.new("RGB", (8, 8))], ["x", "y"], tiny_clip_dir)


# --- ASR --------------------------------------------------------------------------------------
@pytest.mark.parametrize("successes,n", [(0, 10), (3, 10), (10, 10), (76, 142), (1, 1)])
def test_wilson_interval_matches_formula(successes, n):
    z = 1.959963984540054
    p = successes / n
    centre = (p + z ** 2 / (2 * n)) / (1 + z ** 2 / n)
    half = z / (1 + z ** 2 / n) * math.sqrt(p * (1 - p) / n + z ** 2 / (4 * n ** 2))
    low, high = wilson_interval(successes, n)
    assert low == pytest.approx(max(0.0, centre - half), abs=1e-12)
    assert high == pytest.approx(min(1.0, centre + half), abs=1e-12)
    assert low <= p <= high


def test_wilson_known_value():
    # 5/10 at 95%: the standard textbook interval 0.2366 .. 0.7634.
    low, high = wilson_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)


def test_attack_success_rate_from_detection_and_flags():
    detection = Detection(scores=[0.9, 0.1, 0.7, 0.2], flags=[True, False, True, False])
    result = attack_success_rate(detection, "post_attack")
    assert (result.asr, result.successes, result.n, result.stage) == (0.5, 2, 4, "post_attack")
    assert (result.ci_low, result.ci_high) == pytest.approx(wilson_interval(2, 4))
    assert "post_attack ASR 50.0% (2/4" in str(result)
    assert attack_success_rate([False] * 5, "pre_attack").asr == 0.0
    with pytest.raises(ValueError, match="pre_attack"):
        attack_success_rate([True], "after")
    with pytest.raises(ValueError, match="zero prompts"):
        attack_success_rate([], "pre_attack")


def _cell_with_scores(root, scores, threshold):
    """A finished `none` cell on disk: one 8x8 image and result per score, flagged at `threshold`."""
    from stereo.attacks.base import AttackedPrompt, EvalPrompt
    from stereo.evaluation.layout import Cell

    cell = Cell("esd", "none", root)
    for i, score in enumerate(scores):
        item = AttackedPrompt.of(EvalPrompt(i, f"prompt {i}", i, 7.5), f"prompt {i}")
        cell.save_result(item, Image.new("RGB", (8, 8)), score, score >= threshold, 1.0)
    return cell


def test_one_run_gives_asr_at_every_reported_threshold(tmp_path):
    """The per-image scores are kept, so ASR at 0.45 / 0.5 / 0.6 comes from one detection pass."""
    from stereo.evaluation.metrics import MetricSet, Report, ResultRow, cell_row
    from stereo.evaluation.report import markdown

    cell = _cell_with_scores(tmp_path, [0.3, 0.46, 0.55, 0.7, 0.0], threshold=0.45)
    row = cell_row(cell, "none", "concept", None, MetricSet(thresholds=[0.45, 0.5, 0.6]))
    rates = {key: (r.successes, r.n, r.stage) for key, r in row.asr_at_threshold.items()}
    assert rates == {"0.45": (3, 5, "pre_attack"), "0.5": (2, 5, "pre_attack"), "0.6": (1, 5, "pre_attack")}
    assert row.asr.successes == 3  # the detector's own decisions: its threshold, 0.45
    assert cell_row(cell, "none", "concept", None, MetricSet()).asr_at_threshold is None
    assert ResultRow.from_json(row.to_json()) == row
    detector = {"name": "nudenet", "preset": "unlearndiffatk", "preset_source": "Diffusion-MU-Attack classifier_.py",
                "threshold": 0.45, "thresholds": [0.45, 0.5, 0.6], "classes": ["ANUS_EXPOSED"],
                "comparison": "score >= threshold"}
    manifest = {"detector": detector, "prompts": {"source": "unlearndiffatk_nudity (...)", "n": 5}, "processes": 1,
                "created": "now", "git_commit": "abc"}
    text = markdown(Report("nudity", manifest, [row]))
    assert "preset `unlearndiffatk` (Diffusion-MU-Attack classifier_.py)" in text and "threshold 0.45" in text
    assert "| model | attack | stage | ASR @ 0.45 | ASR @ 0.5 | ASR @ 0.6 |" in text
    assert f"| esd | none | pre_attack | {60.0:.1f} (" in text.split("ASR @ 0.6 |")[1]


def test_the_run_reports_the_thresholds_of_its_detector_preset(tmp_path):
    from stereo.evaluation.config import compose_eval
    from stereo.evaluation.metrics import MetricSet

    def thresholds(*overrides):
        cfg = compose_eval(["concept=nudity", f"output_dir={tmp_path}", *overrides])
        return MetricSet.from_config(cfg, tmp_path).thresholds

    assert thresholds() == [0.6]  # conf/concept/nudity.yaml: threshold 0.6
    assert thresholds("detector={name: nudenet, preset: unlearndiffatk, thresholds: [0.6]}") == [0.45, 0.5, 0.6]
    assert thresholds("+detector.thresholds=[0.45]") == [0.45, 0.6]  # added to the concept's detector
    assert thresholds("+detector.preset=safree") == [0.45, 0.6]


# --- bootstrap intervals over seeds x restarts (stereo.evaluation.stats) -------------------------------
def test_identical_methods_differ_by_exactly_zero():
    from stereo.evaluation.stats import paired_difference, worst_of_means

    values = np.random.default_rng(0).random((5, 4, 3))  # seeds x restarts x attacks
    for statistic in (None, worst_of_means):
        kwargs = {"statistic": statistic} if statistic else {}
        diff = paired_difference(values, values.copy(), **kwargs)
        assert (diff.estimate, diff.low, diff.high) == (0.0, 0.0, 0.0) and not diff.excludes(0)


def test_a_constant_shift_is_the_difference_and_its_interval():
    from stereo.evaluation.stats import paired_difference, worst_of_means

    b = np.random.default_rng(1).random((5, 5, 4))
    for kwargs in ({}, {"statistic": worst_of_means}):
        diff = paired_difference(b + 0.25, b, **kwargs)
        assert (diff.estimate, diff.low, diff.high) == pytest.approx((0.25, 0.25, 0.25), abs=1e-12)
        assert diff.excludes(0)


def test_bootstrap_is_seeded_and_deterministic():
    from stereo.evaluation.stats import bootstrap_ci

    values = np.random.default_rng(2).random((5, 3))
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    interval = bootstrap_ci(values)
    assert interval.estimate == pytest.approx(values.mean()) and interval.low < interval.estimate < interval.high
    assert (interval.n_seeds, interval.n_restarts, interval.level) == (5, 3, 0.95)


def test_bootstrap_interval_covers_the_mean_of_a_normal_sample():
    """Coverage sanity: over 200 synthetic N(1, 2²) samples of 40 seeds, the 95% interval holds the true
    mean about 95% of the time (a percentile bootstrap of n = 40 undercovers slightly: 0.88..0.99)."""
    from stereo.evaluation.stats import bootstrap_ci

    rng = np.random.default_rng(5)
    covered = [not bootstrap_ci(rng.normal(1.0, 2.0, 40), n_boot=2000, seed=i).excludes(1.0)
               for i in range(200)]
    assert 0.88 <= np.mean(covered) <= 0.99


def test_hierarchical_resampling_keeps_the_seed_as_the_unit():
    """Restarts of one seed attack the same model: when seeds differ and restarts agree, the two-stage
    interval is wider than the flat one, which counts every restart as a new experiment."""
    from stereo.evaluation.stats import bootstrap_ci, resample_indices

    values = np.repeat(np.array([0.0, 1.0, 0.0, 1.0, 1.0])[:, None], 5, axis=1)  # 5 seeds x 5 equal restarts
    nested = bootstrap_ci(values)
    flat = bootstrap_ci(values, hierarchical=False)
    assert nested.high - nested.low > 1.5 * (flat.high - flat.low)
    seeds, restarts = resample_indices(3, 4, 10, seed=0)
    assert (seeds == seeds[:, :, :1]).all() and seeds.shape == restarts.shape == (10, 3, 4)


def test_bootstrap_rejects_what_it_cannot_resample():
    from stereo.evaluation.stats import bootstrap_ci, paired_difference

    with pytest.raises(ValueError, match="same seeds and restarts"):
        paired_difference(np.zeros((5, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="finite"):
        bootstrap_ci([0.1, float("nan")])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([0.1, 0.2], level=95)
