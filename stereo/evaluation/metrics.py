"""The numbers of an evaluation: one typed `ResultRow` per (model, attack) cell, read back from disk.

A concept row carries ASR (pre-attack for `none` and image folders, post-attack otherwise) with N
and a 95% Wilson interval, the mean detector score, CLIP score and FID of its images (when
configured) and the seconds spent. A `utility` row (non-target prompts: `metrics.utility_prompts`,
and `utility-<name>` per entry of `metrics.utility_sets`) carries the rate at which the utility
detector still finds its concept (higher is better) instead of an ASR. An attack with `restarts: R > 1`
has R rows per model (`restart` 0..R-1); `restart_summaries` gives each restart's ASR, their mean and
the worst restart (report.json's `restarts`). A concept row also carries ASR at each threshold the
detector reports (`asr_at_threshold`: NudeNet presets, `detector.thresholds`), from the per-image scores
on disk, so one run lines up with papers that use another threshold. `Report` is every row plus the run's manifest;
`stereo.evaluation.report` formats it. Intervals over seeds × restarts: `stereo.evaluation.stats`.

FID feature extractors are looked up by name (`metrics.fid.extractor`): `inception` is built in,
others (e.g. the toy world's) are added with `register_feature_extractor(name, factory)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from PIL import Image

from stereo.evaluation.asr import ASRResult, attack_success_rate
from stereo.evaluation.detectors import detector_settings, reported_thresholds
from stereo.evaluation.inputs import IMAGE_SUFFIXES
from stereo.evaluation.layout import Cell
from stereo.generation import open_rgb
from stereo.parallel import on_main

PRE_ATTACK_ROWS = ("none", "images")  # attack names whose ASR is pre-attack


def stage_of(attack_name: str) -> str:
    return "pre_attack" if attack_name in PRE_ATTACK_ROWS else "post_attack"


@dataclass
class ClipSummary:
    """Mean CLIP score of a cell's images against their original prompts."""

    mean: float
    std: float
    n: int
    model: str


@dataclass
class FIDResult:
    """FID of a cell's images against the reference set, with what makes it comparable."""

    fid: float
    n_generated: int
    n_reference: int
    extractor: str
    implementation: str


@dataclass
class ResultRow:
    """One (model, attack) cell's numbers, as report.json holds them."""

    model: str
    attack: str  # the cell: a key of cfg.attacks, or "images" (image folder) / "utility" (non-target prompts)
    attack_name: str  # the attack that ran (for an image folder / utility row: "images" / "utility")
    kind: str  # "concept" (ASR of the erased concept) or "utility" (non-target prompts)
    n: int
    mean_score: float | None  # mean detector score
    seconds: float  # attack + generation + detection, summed over prompts
    clip_score: ClipSummary | None
    fid: FIDResult | None
    stage: str  # pre_attack | post_attack | utility
    asr: ASRResult | None = None  # concept rows
    utility: ASRResult | None = None  # utility rows: share of images where the utility concept is still found
    success_during_attack: int | None = None  # attacks that stop at the first success: prompts that did
    restart: int | None = None  # an attack run with restarts > 1: which restart this cell is (None: no restarts)
    # concept rows: ASR at each reported detector threshold (key: the threshold as text, e.g. "0.45"), from the
    # per-image scores (decision: score >= threshold); None where the detector reports no threshold
    asr_at_threshold: dict[str, ASRResult] | None = None

    @property
    def rate(self) -> ASRResult | None:
        """The row's rate: ASR for a concept row, the utility rate for a utility row."""
        return self.utility if self.kind == "utility" else self.asr

    def to_json(self) -> dict[str, Any]:
        """The report.json form: a concept row has `asr`, a utility row `utility`; `success_during_attack`
        only where the attack recorded it."""
        data: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if (f.name == "asr" and self.kind == "utility") or (f.name == "utility" and self.kind != "utility") \
                    or (f.name in ("success_during_attack", "restart", "asr_at_threshold") and value is None):
                continue
            if f.name == "asr_at_threshold":
                value = {key: asdict(result) for key, result in value.items()}
            data[f.name] = asdict(value) if is_dataclass(value) else value
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResultRow:
        typed = {"clip_score": ClipSummary, "fid": FIDResult, "asr": ASRResult, "utility": ASRResult}
        values = {key: typed[key](**value) if key in typed and value is not None else value
                  for key, value in data.items()}
        if values.get("asr_at_threshold") is not None:
            values["asr_at_threshold"] = {k: ASRResult(**v) for k, v in values["asr_at_threshold"].items()}
        return cls(**values)


@dataclass
class Report:
    """Every row of an evaluation and the manifest that makes it reproducible (report.json)."""

    concept: str
    manifest: dict[str, Any]
    rows: list[ResultRow] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = {"manifest": self.manifest, "concept": self.concept, "rows": [r.to_json() for r in self.rows]}
        restarts = restart_summaries(self.rows)
        if restarts:  # derived from the rows (read back from them, not from this key)
            data["restarts"] = [asdict(r) for r in restarts]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Report:
        return cls(data["concept"], data["manifest"], [ResultRow.from_json(r) for r in data["rows"]])


@dataclass
class RestartSummary:
    """An attack run with restarts on one model: each restart's ASR, their mean and the worst (max) restart."""

    model: str
    attack: str  # the attack's key (restart 0's cell)
    asr: list[float]  # per restart, in restart order
    mean: float
    worst: float
    worst_restart: int


def restart_summaries(rows: list[ResultRow]) -> list[RestartSummary]:
    """One summary per (model, attack) whose rows carry a restart index, in row order."""
    from stereo.evaluation.layout import split_restart

    groups: dict[tuple[str, str], dict[int, float]] = {}
    for row in rows:
        if row.restart is not None and row.asr is not None:
            groups.setdefault((row.model, split_restart(row.attack)[0]), {})[row.restart] = row.asr.asr
    summaries = []
    for (model, attack), by_restart in groups.items():
        rates = [by_restart[r] for r in sorted(by_restart)]
        worst = max(sorted(by_restart), key=lambda r: by_restart[r])
        summaries.append(RestartSummary(model, attack, rates, sum(rates) / len(rates), by_restart[worst], worst))
    return summaries


# --- FID feature extractors ----------------------------------------------------------------------
def _inception(weights: str | None, device) -> Any:
    from stereo.evaluation.inception import InceptionFeatureExtractor

    return InceptionFeatureExtractor.from_file(weights, device)


# name -> factory(weights, device) returning a `stereo.evaluation.fid.FeatureExtractor`
FEATURE_EXTRACTORS: dict[str, Callable[..., Any]] = {"inception": _inception}


def register_feature_extractor(name: str, factory: Callable[..., Any]) -> None:
    """Make `metrics.fid.extractor=<name>` build `factory(weights, device)`; registering it again is a no-op."""
    if FEATURE_EXTRACTORS.get(name, factory) is not factory:
        raise ValueError(f"A feature extractor named {name!r} is already registered ({FEATURE_EXTRACTORS[name]}).")
    FEATURE_EXTRACTORS[name] = factory


def feature_extractor(name: str, weights: str | None, device="cpu", registry: Mapping | None = None):
    """The FID feature extractor registered under `name` (`registry` adds run-local ones)."""
    known = {**FEATURE_EXTRACTORS, **(registry or {})}
    if name not in known:
        raise ValueError(f"metrics.fid.extractor={name!r} is not valid; choose one of {', '.join(sorted(known))} "
                         "(the toy world's `toy` is registered by stereo.toy.features.register())")
    return known[name](weights, device)


# --- CLIP and FID ----------------------------------------------------------------------------------
def threshold_key(threshold: float) -> str:
    """A threshold as the text key of `asr_at_threshold` ("0.45", "0.6")."""
    return repr(float(threshold))


def asr_at_thresholds(scores: Sequence[float], stage: str, thresholds: Sequence[float]) -> dict[str, ASRResult]:
    """ASR at each threshold from per-image detector scores (decision: score >= threshold)."""
    return {threshold_key(t): attack_success_rate([s >= t for s in scores], stage) for t in sorted(thresholds)}


class MetricSet:
    """CLIP score and FID, each only if configured; both load (and fail) before anything is generated. Also the
    concept detector's reported thresholds (`thresholds`), at which each concept row gives ASR."""

    def __init__(self, clip=None, clip_name: str | None = None, extractor=None, reference=None,
                 thresholds: Sequence[float] = ()):
        self.clip, self.clip_name, self.extractor, self.reference = clip, clip_name, extractor, reference
        self.thresholds = list(thresholds)

    @classmethod
    def from_config(cls, cfg, out: Path, accelerator=None, extractors: Mapping | None = None) -> MetricSet:
        """CLIP on the main process (it scores), FID's extractor on every process (each extracts a share of
        the reference features), all on the run's device. A bad CLIP folder raises on every process (`on_main`),
        before the reference features' gather: the others would wait there for `dist_timeout_minutes`."""
        clip = clip_name = extractor = reference = None
        device = accelerator.device if accelerator is not None else "cpu"
        concept = next(iter(cfg.concepts.values()))
        thresholds = reported_thresholds(detector_settings(_plain(cfg.detector), _plain(concept.detector)))
        if cfg.metrics.clip_path:
            from stereo.evaluation.clip_score import load_clip

            clip = on_main(lambda: load_clip(cfg.metrics.clip_path, device), accelerator)  # None on the others
            clip_name = str(cfg.metrics.clip_path) if clip is not None else None
        fid = cfg.metrics.fid
        if fid.extractor:
            from stereo.evaluation.fid import reference_stats

            extractor = feature_extractor(fid.extractor, fid.weights, device, extractors)
            folder = Path(fid.reference_dir)
            if not folder.is_dir():
                raise FileNotFoundError(f"FID reference folder {folder} does not exist (metrics.fid.reference_dir); "
                                        "put the real images (e.g. COCO val2014) there")
            paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            reference = reference_stats(paths, extractor, fid.cache_dir or out / "fid_cache", accelerator=accelerator)
        return cls(clip, clip_name, extractor, reference, thresholds)

    def clip_score(self, images: list[Image.Image], prompts: list[str]) -> ClipSummary | None:
        if self.clip is None or not images:
            return None
        from stereo.evaluation.clip_score import clip_scores

        model, processor = self.clip
        result = clip_scores(images, prompts, model, processor, model_name=self.clip_name)
        return ClipSummary(result.mean, result.std, result.n, result.model)

    def fid(self, images: list[Image.Image]) -> FIDResult | None:
        if self.extractor is None or len(images) < 2:
            return None
        from stereo.evaluation.fid import compute_fid

        return FIDResult(**compute_fid(images, self.reference, self.extractor))

    def describe(self) -> dict[str, Any]:
        return {"clip_model": self.clip_name, "fid_extractor": getattr(self.extractor, "name", None),
                "fid_reference_n": self.reference.n if self.reference is not None else None,
                "asr_thresholds": self.thresholds}


def _plain(node) -> dict | None:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


# --- one row per cell ------------------------------------------------------------------------------
def cell_row(cell: Cell, attack_name: str, kind: str, n_prompts: int | None, metrics: MetricSet,
             restart: int | None = None, thresholds: Sequence[float] | None = None) -> ResultRow:
    """A cell's row from its per-prompt results on disk. Results of prompts beyond this run's prompt set
    (`n_prompts`; None for an image folder, which has no prompt set) stay on disk, out of the numbers.
    `restart`: the cell's restart index when its attack runs several restarts. A concept row gives ASR at each
    of `thresholds` (default: `metrics.thresholds`, the concept detector's) from the per-image scores."""
    results = cell.results()
    if n_prompts is not None:
        results = [r for r in results if r["index"] < n_prompts]
    flags = [r["flag"] for r in results]
    images = [open_rgb(cell.root / r["image"]) for r in results]
    known = [(im, r["prompt"]) for im, r in zip(images, results) if r["prompt"]]
    stage = "utility" if kind == "utility" else stage_of(attack_name)
    thresholds = metrics.thresholds if thresholds is None else thresholds
    rate = attack_success_rate(flags, "pre_attack" if kind == "utility" else stage) if flags else None
    during = None
    if kind != "utility" and any("success_during_attack" in r["info"] for r in results):
        during = sum(bool(r["info"].get("success_during_attack")) for r in results)
    return ResultRow(
        model=cell.model, attack=cell.attack, attack_name=attack_name, kind=kind, n=len(results),
        mean_score=sum(r["score"] for r in results) / len(results) if results else None,
        seconds=sum(r["seconds"] for r in results),
        clip_score=metrics.clip_score([im for im, _ in known], [p for _, p in known]),
        fid=metrics.fid(images), stage=stage,
        asr=rate if kind != "utility" else None, utility=rate if kind == "utility" else None,
        success_during_attack=during, restart=restart,
        asr_at_threshold=asr_at_thresholds([r["score"] for r in results], stage, thresholds)
        if kind != "utility" and results and thresholds else None)
