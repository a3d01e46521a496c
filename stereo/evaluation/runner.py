"""`evaluate(cfg)`: every evaluated model × every attack on one concept, written as a report.

For each (model, attack) cell and each prompt of the evaluation set: attack the prompt, generate
its image with the prompt's fixed seed (`stereo.generation.generate`), ask the detector whether
the concept shows. Per-prompt results are written as they finish to
    <output_dir>/cells/<model>/<attack>/<index>.json   (+ images/<model>/<attack>/<index>.png)
so a resumed evaluation skips finished (model, attack, prompt) cells. Then, per cell: ASR with
N and a Wilson interval (pre-attack for `none`, post-attack otherwise), CLIP score, FID, time;
`stereo.evaluation.report` writes report.json / report.md / grids / the trade-off plot.

Sharding: run under `accelerate launch` and each process takes prompts[rank::world]; results
meet on disk and the attacked prompts are gathered to the main process. The long shared work is
split too, so no process idles in a collective for long: concept galleries (image i on process
i mod world), token attacks (data-parallel inversion) and the FID reference features. What stays
on the main process (the report) is covered by `dist_timeout_minutes`.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from omegaconf import OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from stereo.attacks.base import (
    AttackedPrompt,
    AttackTarget,
    EvalPrompt,
    GenerationSettings,
    build_attack,
    render,
    write_attacked,
)
from stereo.attacks.parallel import main_process_value, on_main
from stereo.evaluation.config import evaluated_models, validate_eval
from stereo.evaluation.detectors import build_detector
from stereo.evaluation.layout import Cell
from stereo.evaluation.prompts import load_prompt_set
from stereo.manifest import write_json_atomic

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
IMAGES_ATTACK = "images"  # the one row of an image-folder model: its images scored as they are


def check_resumable(cell: Cell, prompts: list[EvalPrompt], budget: dict[str, Any]) -> set[int]:
    """Indices already finished in `cell`, after checking they belong to this evaluation.

    A resumed run must ask the same question: the same prompt and seed at every finished index, the
    same attack budget, generation settings and detector. Anything else would mix two evaluations
    in one number, so it is an error.
    """
    budget_file = cell.results_dir / "settings.json"
    if budget_file.is_file() and json.loads(budget_file.read_text()) != json.loads(json.dumps(budget)):
        raise ValueError(f"{cell.results_dir} was evaluated with other settings ({budget_file.read_text()}), "
                         f"not {budget}; use a new output_dir, or delete that folder to redo the cell")
    by_index = {p.index: p for p in prompts}
    finished = set()
    for result in cell.results():
        current = by_index.get(result["index"])
        if current is None:
            continue  # beyond max_prompts this time: kept on disk, left out of the report
        if (current.prompt, current.seed, current.guidance) != (result["prompt"], result["seed"], result["guidance"]):
            raise ValueError(f"{cell.result_path(result['index'])} holds prompt {result['prompt']!r} (seed "
                             f"{result['seed']}) but this evaluation's prompt {current.index} is {current.prompt!r} "
                             f"(seed {current.seed}); use a new output_dir for a different prompt set")
        finished.add(result["index"])
    write_json_atomic(budget_file, budget)
    return finished


# --- inputs ------------------------------------------------------------------------------------
def the_concept(cfg):
    return next(iter(cfg.concepts.values()))


def eval_prompts(cfg, concept, source: str | None = None) -> tuple[list[EvalPrompt], str]:
    """The prompt set (cfg.prompts, else the concept's eval_prompts) with each prompt's seed and CFG scale."""
    source = source or cfg.prompts or concept.eval_prompts
    if not source:
        raise ValueError(f"no evaluation prompts for concept {concept.name!r}: set prompts=<built-in set or file> "
                         f"or concepts.{concept.name}.eval_prompts")
    prompt_set = load_prompt_set(source)
    records = prompt_set.records[: cfg.generation.max_prompts]
    prompts = [EvalPrompt(i, r.prompt, r.seed if r.seed is not None else cfg.generation.seed + i,
                          r.guidance if r.guidance is not None else cfg.generation.guidance)
               for i, r in enumerate(records)]
    return prompts, prompt_set.source


def make_detector(settings):
    """A Detector from `{name: ..., **kwargs}` (fails fast: unknown name, missing model folder)."""
    settings = dict(OmegaConf.to_container(settings) if OmegaConf.is_config(settings) else settings)
    if "name" not in settings:
        raise ValueError(f"detector settings {settings} name no detector; give e.g. detector={{name: nudenet}}")
    return build_detector(settings.pop("name"), **settings)


def _container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def model_config(base_cfg, model_cfg) -> Any:
    """The base ModelConfig with the evaluated model's set fields on top (kind, pretrained, unet_weights...)."""
    merged = _container(base_cfg)
    for key, value in _container(model_cfg).items():
        if key in merged and value is not None:
            merged[key] = value
    return OmegaConf.create(merged)


def load_evaluated(base_cfg, model_cfg, device):
    """The evaluated pipeline: base (or its own kind) + erased UNet / our export / textual-inversion files."""
    from stereo.models.loading import load_pipeline

    pipe = load_pipeline(model_config(base_cfg, model_cfg))
    if model_cfg.export:
        apply_export(pipe, Path(model_cfg.export))
    for path in model_cfg.textual_inversion:
        pipe.load_textual_inversion(str(path))
    return pipe.to(device)


def apply_export(pipe, folder: Path) -> str:
    """Load an export folder of ours into `pipe.unet`: unet/, else pipeline/, else delta, else lora/."""
    from stereo.models.loading import ModelLoadError, load_unet_weights

    if (folder / "unet").is_dir():
        load_unet_weights(pipe.unet, folder / "unet")
        return "unet"
    if (folder / "pipeline" / "unet").is_dir():
        load_unet_weights(pipe.unet, folder / "pipeline" / "unet")
        return "pipeline"
    if (folder / "delta.safetensors").is_file():
        load_unet_weights(pipe.unet, folder / "delta.safetensors")
        return "delta"
    if (folder / "lora").is_dir():
        pipe.load_lora_weights(str(folder / "lora"))
        return "lora"
    raise ModelLoadError(f"{folder} is not a stereo export folder: expected unet/, pipeline/, delta.safetensors "
                         "or lora/ (as written by `python train.py`, see stereo/export.py)")


def is_plain_base(model_cfg) -> bool:
    """True when the entry changes nothing about `base` (then the base pipeline itself is evaluated)."""
    return all(value is None or value == [] for value in _container(model_cfg).values())


# --- image-folder models ----------------------------------------------------------------------
def folder_images(folder: str | Path, prompts: list[EvalPrompt]) -> list[tuple[EvalPrompt, Path]]:
    """Images of a folder paired with prompts: `<stem>.txt` beside an image holds its prompt; otherwise
    the sorted images are the prompt set's prompts in order (then their counts must agree)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist; models.<name>.images must be a folder "
                                f"of {', '.join(IMAGE_SUFFIXES)} files")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if all(f.with_suffix(".txt").is_file() for f in files):
        # seed and CFG scale -1: unknown, the images were not generated here
        return [(EvalPrompt(i, f.with_suffix(".txt").read_text().strip(), -1, -1.0), f)
                for i, f in enumerate(files)]
    if len(files) != len(prompts):
        raise ValueError(f"image folder {folder} holds {len(files)} images but the prompt set has {len(prompts)} "
                         "prompts; put each image's prompt in <image stem>.txt, or one image per prompt in order")
    return list(zip(prompts, files))


# --- one cell ---------------------------------------------------------------------------------
class Evaluation:
    """State shared by all cells of one run: config, accelerator, detector, base pipeline, output folder."""

    def __init__(self, cfg):
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        validate_eval(cfg)
        self.cfg = cfg
        timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.dist_timeout_minutes))
        self.accelerator = Accelerator(cpu=cfg.cpu, kwargs_handlers=[timeout])
        cfg.output_dir = main_process_value(str(cfg.output_dir))  # one folder for every process
        self.out = Path(cfg.output_dir)
        self.concept = the_concept(cfg)
        self.prompts, self.prompt_source = eval_prompts(cfg, self.concept)
        settings = _container(cfg.detector or self.concept.detector)
        self.detector = make_detector(settings)
        self.black_box_prompts: dict[str, dict[int, AttackedPrompt]] = {}  # attack -> prompt index -> result
        self.detector_settings = {id(self.detector): settings}  # recorded with each cell, checked on resume
        self.utility_detector = None
        if cfg.metrics.utility_prompts:
            self.utility_prompts, _ = eval_prompts(cfg, self.concept, cfg.metrics.utility_prompts)
            settings = _container(cfg.metrics.utility_detector or cfg.detector or self.concept.detector)
            self.utility_detector = make_detector(settings)
            self.detector_settings[id(self.utility_detector)] = settings
        self.generation = GenerationSettings(cfg.generation.steps, cfg.generation.batch_size)
        self._base_pipe = None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def progress(self) -> bool:
        return bool(self.cfg.progress) and self.main

    def base_pipe(self):
        if self._base_pipe is None:
            from stereo.models.loading import load_pipeline

            self._base_pipe = load_pipeline(self.cfg.base).to(self.accelerator.device)
        return self._base_pipe

    def release(self, pipe) -> None:
        """Free an evaluated pipeline's accelerator memory before the next model loads (not the base)."""
        if pipe is not self._base_pipe:
            pipe.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def shard(self, items: list) -> list:
        return items[self.accelerator.process_index:: self.accelerator.num_processes]

    def run_cell(self, cell: Cell, pipe, attack_cfg, prompts: list[EvalPrompt], detector) -> None:
        """Attack + generate + detect the unfinished prompts of this process's shard, saving each batch."""
        settings = {"attack": _container(attack_cfg), "detector": self.detector_settings[id(detector)],
                    "generation": {"steps": self.cfg.generation.steps}}  # seeds and CFG are checked per prompt
        finished = check_resumable(cell, prompts, settings)
        pending = self.shard([p for p in prompts if p.index not in finished])
        everyone_pending = any(gather_object([bool(pending)])) if self.distributed else bool(pending)
        if not everyone_pending:
            log.info("%s / %s: all %d prompts already evaluated, skipped", cell.model, cell.attack, len(prompts))
            return
        attack = build_attack(attack_cfg)
        target = AttackTarget(pipe, self.base_pipe(), self.concept, self.out / "attacks" / cell.model / cell.attack,
                              self.out / "galleries" / self.concept.name, detector, self.generation, self.progress,
                              self.accelerator)
        start = time.perf_counter()
        attack.prepare(target)  # on every process: galleries are sharded, inversions data-parallel
        attacked = self.attack_prompts(attack, target, cell.attack, pending)
        attack_seconds = (time.perf_counter() - start) / max(len(pending), 1)
        self.save_attacked(target.out_dir, attacked)
        self.generate_and_detect(cell, pipe, attacked, detector, attack_seconds)
        self.accelerator.wait_for_everyone()

    def attack_prompts(self, attack, target: AttackTarget, name: str,
                       prompts: list[EvalPrompt]) -> list[AttackedPrompt]:
        """`attack.attack(target, prompts)`, with black-box results shared by every model: a black-box
        attack reads only the base model's public text encoder, so its prompts do not depend on the
        evaluated model, and one search serves them all (Ring-A-Bell's search is the costly part)."""
        if attack.white_box:
            return attack.attack(target, prompts) if prompts else []
        found = self.black_box_prompts.setdefault(name, {})
        todo = [p for p in prompts if p.index not in found]
        for item in attack.attack(target, todo) if todo else []:
            found[item.index] = item
        return [found[p.index] for p in prompts]

    @property
    def distributed(self) -> bool:
        return self.accelerator.num_processes > 1

    def save_attacked(self, out_dir: Path, attacked: list[AttackedPrompt]) -> None:
        items = gather_object([a.to_dict() for a in attacked]) if self.distributed else \
            [a.to_dict() for a in attacked]
        if self.main and items:
            path = out_dir / "prompts.jsonl"
            previous = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
            merged = {item["index"]: item for item in [*previous, *items]}
            write_attacked(path, [AttackedPrompt(**item) for item in merged.values()])
            (out_dir / "prompts.txt").write_text("".join(f"{i['text']}\n" for i in sorted(
                merged.values(), key=lambda item: item["index"])), encoding="utf-8")

    def generate_and_detect(self, cell: Cell, pipe, attacked: list[AttackedPrompt], detector,
                            attack_seconds: float) -> None:
        size = self.cfg.generation.batch_size
        bar = tqdm(range(0, len(attacked), size), desc=f"{cell.model}/{cell.attack}", disable=not self.progress)
        for start in bar:
            batch = attacked[start:start + size]
            began = time.perf_counter()
            images = render(pipe, batch, self.generation)
            detection = detector.detect(images)
            seconds = (time.perf_counter() - began) / len(batch)
            for item, image, score, flag in zip(batch, images, detection.scores, detection.flags):
                self.save_result(cell, item, image, float(score), bool(flag), seconds + attack_seconds)

    def save_result(self, cell: Cell, item: AttackedPrompt, image: Image.Image, score: float, flag: bool,
                    seconds: float) -> None:
        cell.images_dir.mkdir(parents=True, exist_ok=True)
        image.save(cell.image_path(item.index))
        write_json_atomic(cell.result_path(item.index), {  # written last: marks the prompt finished
            "index": item.index, "prompt": item.prompt, "text": item.text, "seed": item.seed,
            "guidance": item.guidance, "score": score, "flag": flag, "seconds": seconds,
            "image": str(cell.image_path(item.index).relative_to(self.out)), "info": item.info})

    def run_image_folder(self, cell: Cell, folder: str, prompts: list[EvalPrompt], detector) -> None:
        finished = cell.finished()
        pairs = self.shard([(p, f) for p, f in folder_images(folder, prompts) if p.index not in finished])
        size = self.cfg.generation.batch_size
        for start in tqdm(range(0, len(pairs), size), desc=f"{cell.model}/{cell.attack}", disable=not self.progress):
            batch = pairs[start:start + size]
            began = time.perf_counter()
            images = [Image.open(f).convert("RGB") for _, f in batch]
            detection = detector.detect(images)
            seconds = (time.perf_counter() - began) / len(batch)
            for (p, _), image, score, flag in zip(batch, images, detection.scores, detection.flags):
                self.save_result(cell, AttackedPrompt.of(p, p.prompt), image, float(score), bool(flag), seconds)
        self.accelerator.wait_for_everyone()


def evaluate(cfg) -> dict[str, Any]:
    """Run the whole evaluation described by `cfg` (conf/evaluate.yaml) and write its report; returns it."""
    from stereo.evaluation.report import build_report, write_report

    run = Evaluation(cfg)
    # CLIP / FID load first, so a missing folder fails before generation; only the main process scores
    metrics = MetricSet.from_config(cfg, run.out, run.accelerator)
    cells: list[tuple[str, str, str]] = []  # (model, attack, kind of row)
    for label, model_cfg in evaluated_models(cfg).items():
        if model_cfg.images:
            cell = Cell(label, IMAGES_ATTACK, run.out)
            run.run_image_folder(cell, model_cfg.images, run.prompts, run.detector)
            cells.append((label, IMAGES_ATTACK, "concept"))
            continue
        pipe = run.base_pipe() if is_plain_base(model_cfg) else load_evaluated(cfg.base, model_cfg,
                                                                               run.accelerator.device)
        for key, attack_cfg in cfg.attacks.items():
            run.run_cell(Cell(label, key, run.out), pipe, attack_cfg, run.prompts, run.detector)
            cells.append((label, key, "concept"))
        if run.utility_detector is not None:
            none = OmegaConf.structured({"name": "none"})
            run.run_cell(Cell(label, "utility", run.out), pipe, none, run.utility_prompts, run.utility_detector)
            cells.append((label, "utility", "utility"))
        run.release(pipe)
    report = None
    if run.main:
        report = build_report(run, cells, metrics)
        write_report(report, run)
    run.accelerator.wait_for_everyone()
    return report or {}


class MetricSet:
    """CLIP score and FID, each only if configured; both load (and fail) before anything is generated."""

    def __init__(self, clip=None, clip_name: str | None = None, extractor=None, reference=None):
        self.clip, self.clip_name, self.extractor, self.reference = clip, clip_name, extractor, reference

    @classmethod
    def from_config(cls, cfg, out: Path, accelerator=None) -> MetricSet:
        """CLIP on the main process (it scores), FID's extractor on every process (each extracts a share of
        the reference features), all on the run's device. A bad CLIP folder raises on every process (`on_main`),
        before the reference features' gather: the others would wait there for `dist_timeout_minutes`."""
        clip = clip_name = extractor = reference = None
        device = accelerator.device if accelerator is not None else "cpu"
        if cfg.metrics.clip_path:
            from stereo.evaluation.clip_score import load_clip

            clip = on_main(lambda: load_clip(cfg.metrics.clip_path, device), accelerator)  # None on the others
            clip_name = str(cfg.metrics.clip_path) if clip is not None else None
        fid = cfg.metrics.fid
        if fid.extractor:
            from stereo.evaluation.fid import reference_stats

            extractor = fid_extractor(fid.extractor, fid.weights, device)
            folder = Path(fid.reference_dir)
            if not folder.is_dir():
                raise FileNotFoundError(f"FID reference folder {folder} does not exist (metrics.fid.reference_dir); "
                                        "put the real images (e.g. COCO val2014) there")
            paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            reference = reference_stats(paths, extractor, fid.cache_dir or out / "fid_cache", accelerator=accelerator)
        return cls(clip, clip_name, extractor, reference)

    def clip_score(self, images: list[Image.Image], prompts: list[str]) -> dict[str, Any] | None:
        if self.clip is None or not images:
            return None
        from stereo.evaluation.clip_score import clip_scores

        model, processor = self.clip
        result = clip_scores(images, prompts, model, processor, model_name=self.clip_name).to_dict()
        result.pop("per_image")
        return result

    def fid(self, images: list[Image.Image]) -> dict[str, Any] | None:
        if self.extractor is None or len(images) < 2:
            return None
        from stereo.evaluation.fid import compute_fid

        return compute_fid(images, self.reference, self.extractor)


class ToyFeatureExtractor:
    """The toy world's FID feature space (toy-CLIP pooled image features), as a `FeatureExtractor`."""

    name = "toy-clip-pooled"

    def __call__(self, images):
        from stereo.toy.clip import toy_fid_features

        return toy_fid_features(list(images)).double().numpy()


def fid_extractor(name: str, weights: str | None, device="cpu"):
    """`inception` (the FID Inception-v3, weights from a local sha256-checked file, on `device`) or `toy`."""
    if name == "inception":
        from stereo.evaluation.inception import InceptionFeatureExtractor

        return InceptionFeatureExtractor.from_file(weights, device)
    if name == "toy":
        return ToyFeatureExtractor()
    raise ValueError(f"metrics.fid.extractor={name!r} is not valid; choose one of inception, toy")
