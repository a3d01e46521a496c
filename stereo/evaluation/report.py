"""The evaluation report: report.json (every number + manifest), report.md, PNG grids, trade-off plot.

It only formats: the rows are `stereo.evaluation.metrics.ResultRow`s, computed by the metrics step.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from stereo.evaluation.asr import ASRResult
from stereo.evaluation.metrics import PRE_ATTACK_ROWS, Report, restart_summaries
from stereo.generation import image_grid
from stereo.manifest import write_json_atomic


def write_report(report: Report, out: Path, grid_prompts: int) -> None:
    """report.json, report.md, one grid per attack (`grid_prompts` columns), the trade-off plot (several models)."""
    write_json_atomic(out / "report.json", report.to_json())
    (out / "report.md").write_text(markdown(report), encoding="utf-8")
    for attack in sorted({r.attack for r in report.rows if r.kind == "concept"}):
        grid = comparison_grid(out, report, attack, grid_prompts)
        if grid is not None:
            grid.save(out / f"grid_{attack}.png")
    if len({r.model for r in report.rows}) > 1:
        plot = tradeoff_plot(report)
        if plot is not None:
            plot.save(out / "tradeoff.png")


# --- markdown ---------------------------------------------------------------------------------
def _percent(result: ASRResult | None) -> str:
    if not result:
        return "–"
    return f"{100 * result.asr:.1f} ({100 * result.ci_low:.1f}–{100 * result.ci_high:.1f})"


def _number(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def detector_line(detector: dict) -> str:
    """The detector settings that decide the numbers, in words: name, preset (and its source), threshold, labels."""
    if not isinstance(detector, dict) or "name" not in detector:
        return f"Detector: `{detector}`"
    parts = [f"Detector: `{detector['name']}`"]
    if detector.get("preset"):
        parts.append(f"preset `{detector['preset']}` ({detector.get('preset_source', '')})")
    if detector.get("threshold") is not None:
        comparison = detector.get("comparison", "score >= threshold")
        parts.append(f"decision {comparison} with threshold {detector['threshold']}")
    if detector.get("classes"):
        parts.append(f"labels {', '.join(detector['classes'])}")
    rest = {k: v for k, v in detector.items()
            if k not in ("name", "preset", "preset_source", "preset_note", "threshold", "comparison", "classes",
                         "thresholds")}
    line = "; ".join(parts) + (f"; other settings `{rest}`" if rest else "")
    if detector.get("preset_note"):
        line += f"  \nPreset note: {detector['preset_note']}"
    return line


def threshold_table(report: Report) -> list[str]:
    """ASR % of each concept row at every reported detector threshold (empty with fewer than two thresholds)."""
    keys = sorted({k for r in report.rows if r.asr_at_threshold for k in r.asr_at_threshold}, key=float)
    if len(keys) < 2:
        return []
    lines = ["", "ASR % (95% Wilson interval) at each detector threshold, from the same per-image scores "
                 "(decision: score >= threshold), to line up with papers that use another threshold.", "",
             "| model | attack | stage | " + " | ".join(f"ASR @ {k}" for k in keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    for row in report.rows:
        if row.asr_at_threshold:
            cells = [_percent(row.asr_at_threshold.get(k)) for k in keys]
            lines.append(f"| {row.model} | {row.attack} | {row.stage} | " + " | ".join(cells) + " |")
    return lines


def markdown(report: Report) -> str:
    manifest = report.manifest
    lines = [
        f"# Evaluation: concept `{report.concept}`", "",
        f"{detector_line(manifest['detector'])}  ", f"Prompts: {manifest['prompts']['source']} "
        f"(N = {manifest['prompts']['n']}), {manifest['processes']} process(es), "
        f"created {manifest['created']}, commit {manifest['git_commit']}.", "",
        "ASR % with 95% Wilson interval: *pre_attack* = plain prompts, *post_attack* = after the attack. "
        "Utility rows: % of non-target prompts where the utility detector still finds its concept.", "",
        "| model | attack | stage | ASR / utility % (95% CI) | N | CLIP score | FID | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report.rows:
        clip = row.clip_score.mean if row.clip_score else None
        fid = row.fid.fid if row.fid else None
        lines.append(f"| {row.model} | {row.attack} | {row.stage} | {_percent(row.rate)} | {row.n} | "
                     f"{_number(clip)} | {_number(fid)} | {_number(row.seconds, 1)} |")
    lines += threshold_table(report)
    restarts = restart_summaries(report.rows)
    if restarts:
        lines += ["", "Restarts: independent runs of an attack (own seed and start); ASR % of each restart, "
                      "their mean and the worst restart.", "",
                  "| model | attack | ASR per restart (%) | mean (%) | worst (%) |", "|---|---|---|---|---|"]
        for r in restarts:
            lines.append(f"| {r.model} | {r.attack} | {', '.join(f'{100 * a:.1f}' for a in r.asr)} | "
                         f"{100 * r.mean:.1f} | {100 * r.worst:.1f} (restart {r.worst_restart}) |")
    fid_rows = [r.fid for r in report.rows if r.fid]
    if fid_rows:
        lines += ["", f"FID: {fid_rows[0].implementation}, extractor {fid_rows[0].extractor}, "
                      f"reference N = {fid_rows[0].n_reference}; numbers from other FID implementations "
                      "are not comparable."]
    return "\n".join(lines) + "\n"


# --- pictures ---------------------------------------------------------------------------------
def _labelled(image: Image.Image, label: str, width: int = 96) -> Image.Image:
    canvas = Image.new("RGB", (image.width + width, image.height), "white")
    canvas.paste(image, (width, 0))
    ImageDraw.Draw(canvas).text((4, 4), label[:16], fill="black", font=ImageFont.load_default())
    return canvas


def comparison_grid(out: Path, report: Report, attack: str, columns: int) -> Image.Image | None:
    """One row per model (image folders join the `none` grid), the same first `columns` prompts in every row."""
    rows = [r for r in report.rows if r.attack == attack or (attack == "none" and r.attack == "images")]
    strips = []
    for row in rows:
        paths = sorted((out / "images" / row.model / row.attack).glob("*.png"))[:int(columns)]
        if paths:
            images = [Image.open(p).convert("RGB") for p in paths]
            size = images[0].size
            strip = image_grid([im.resize(size) for im in images], cols=len(images))
            strips.append(_labelled(strip, row.model))
    if not strips:
        return None
    width = max(s.width for s in strips)
    grid = Image.new("RGB", (width, sum(s.height for s in strips)), "white")
    top = 0
    for strip in strips:
        grid.paste(strip, (0, top))
        top += strip.height
    return grid


def model_points(report: Report) -> dict[str, dict[str, float]]:
    """Per model: worst-case ASR over its concept rows (every restart included), and its utility metrics,
    taken from its first utility row (non-target prompts) if there is one, else from its pre-attack row;
    the utility rate is the mean over all its utility rows."""
    points: dict[str, dict[str, float]] = {}
    for model in dict.fromkeys(r.model for r in report.rows):
        rows = [r for r in report.rows if r.model == model]
        rates = [100 * r.asr.asr for r in rows if r.kind == "concept" and r.asr]
        source = next((r for r in rows if r.kind == "utility"), None) or \
            next((r for r in rows if r.attack_name in PRE_ATTACK_ROWS), None)
        kept = [100 * r.utility.asr for r in rows if r.kind == "utility" and r.utility]
        point = points.setdefault(model, {})
        if rates:
            point["asr"] = max(rates)
        if source and source.clip_score:
            point["clip"] = source.clip_score.mean
        if source and source.fid:
            point["fid"] = source.fid.fid
        if kept:
            point["utility"] = sum(kept) / len(kept)
    return points


AXES = {"clip": "CLIP score", "fid": "FID", "utility": "utility %"}


def tradeoff_plot(report: Report) -> Image.Image | None:
    """Worst-case ASR (x) against each available utility metric (y), one panel per metric."""
    points = model_points(report)
    panels = []
    for key, label in AXES.items():
        data = [(model, p["asr"], p[key]) for model, p in points.items() if "asr" in p and key in p]
        if len(data) > 1:
            panels.append(scatter(data, "worst-case ASR %", label))
    return side_by_side(panels)


def side_by_side(panels: list[Image.Image]) -> Image.Image | None:
    """Equal-sized plot panels in one row (None without any)."""
    if not panels:
        return None
    plot = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), "white")
    for i, panel in enumerate(panels):
        plot.paste(panel, (i * panel.width, 0))
    return plot


def scatter(data: list[tuple[str, float, float]], x_label: str, y_label: str,
            size: tuple[int, int] = (420, 320), margin: int = 50,
            errors: list[tuple[float, float, float, float]] | None = None, title: str = "") -> Image.Image:
    """A labelled scatter plot drawn with PIL (no matplotlib dependency); `errors`: per point
    (x low, x high, y low, y high), drawn as interval bars."""
    image = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    w, h = size[0] - 2 * margin, size[1] - 2 * margin

    def span(values: list[float]) -> tuple[float, float]:
        low, high = min(values), max(values)
        pad = (high - low) * 0.1 or max(abs(high) * 0.1, 1.0)
        return low - pad, high + pad

    xs = [d[1] for d in data] + [v for e in errors or [] for v in e[:2]]
    ys = [d[2] for d in data] + [v for e in errors or [] for v in e[2:]]
    (x0, x1), (y0, y1) = span(xs), span(ys)

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return margin + (x - x0) / (x1 - x0) * w, margin + h - (y - y0) / (y1 - y0) * h

    draw.rectangle([margin, margin, margin + w, margin + h], outline="black")
    for i in range(5):
        fx, fy = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        px, _ = to_pixel(fx, y0)
        _, py = to_pixel(x0, fy)
        draw.text((px - 10, margin + h + 4), f"{fx:.3g}", fill="black", font=font)
        draw.text((4, py - 5), f"{fy:.3g}", fill="black", font=font)
    draw.text((margin + w // 2 - 40, size[1] - 18), x_label, fill="black", font=font)
    draw.text((margin, 8), f"{y_label}   {title}" if title else y_label, fill="black", font=font)
    for (xl, xh, yl, yh), (_, x, y) in zip(errors or [], data):
        (pxl, py), (pxh, _) = to_pixel(xl, y), to_pixel(xh, y)
        (px, pyl), (_, pyh) = to_pixel(x, yl), to_pixel(x, yh)
        draw.line([pxl, py, pxh, py], fill=(120, 120, 120))
        draw.line([px, pyl, px, pyh], fill=(120, 120, 120))
    placed: list[tuple[float, float]] = []  # label positions so far: a label at a taken place moves down
    for label, x, y in data:
        px, py = to_pixel(x, y)
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=(31, 119, 180))
        ty = py - 6
        while any(abs(ty - oy) < 11 and abs(px - ox) < 60 for ox, oy in placed):
            ty += 11
        placed.append((px, ty))
        draw.text((px + 6, ty), short_label(label), fill="black", font=font)
    return image


def short_label(label: str, width: int = 28) -> str:
    """`label` in at most `width` characters, keeping its start and its end: variants of one method differ by
    their suffix (`...-slow`, `...-slow-focus2`), so a plain prefix would print them the same."""
    if len(label) <= width:
        return label
    head = (width - 2) // 2
    return f"{label[:head]}..{label[len(label) - (width - 2 - head):]}"
