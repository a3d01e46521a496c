"""Evaluation: attacks, concept detectors, attack success rate, CLIP score, FID, reports.

- `detectors`: the Detector interface, `build_detector` / `register_detector`, NudeNet, image
  classifier, CLIP zero-shot; `moderation`: the optional OpenAI moderation judge.
- `asr`: attack success rate with N and a 95% Wilson interval, pre- or post-attack.
- `clip_score`: 100 * max(cos(image, text), 0) with a local CLIPModel.
- `fid`: Fréchet distance, `FeatureStats` caching, the feature-extractor interface;
  `inception`: the FID Inception-v3 network (local, sha256-checked weights).
- `prompts`: I2P-style prompt sets and the built-in sets in `prompt_sets/`.
"""
