"""Evaluation: erased models under attack, scored by concept detectors, ASR, CLIP score, FID, reports.

One run (`runner.evaluate(cfg)`, from `python evaluate.py`), in the order it happens:
- `config`: the typed schemas (one per attack) and their checks; `inputs`: the concept, prompts,
  detectors and evaluated models (our exports are read by `stereo.load_export`);
- `cells`: the cell loop, attack -> generate -> detect -> save, per (model, attack); `layout`: where
  each result lives on disk and the resume checks;
- `metrics`: one typed `ResultRow` per cell (ASR, CLIP, FID, time), the `Report`;
  `report`: report.json / report.md / grids / trade-off plot, formatted from those rows.
Building blocks: `detectors` (interface + registry; `nudenet`, `classifiers`, `moderation`), `asr`
(N and a 95% Wilson interval), `clip_score`, `fid` (+ `inception`), `prompts` (prompt sets).
Other packages add detectors and FID feature spaces by name (`register_detector`,
`register_feature_extractor`), e.g. the toy world's: evaluation never imports them.
"""
