"""The toy world's FID feature space for the evaluation: `metrics.fid.extractor=toy`.

The toy CLIP's pooled image features (`stereo.toy.clip.toy_fid_features`) play, for toy scenes,
the role the Inception-v3 pool features play for photographs. `register()` adds the extractor to
the evaluation's registry under `toy` (evaluate.py calls it; registering again is a no-op).
"""

from __future__ import annotations

from stereo.evaluation.metrics import register_feature_extractor


class ToyFeatureExtractor:
    """The toy world's FID feature space (toy-CLIP pooled image features), as a `FeatureExtractor`."""

    name = "toy-clip-pooled"

    def __call__(self, images):
        from stereo.toy.clip import toy_fid_features

        return toy_fid_features(list(images)).double().numpy()


def toy_feature_extractor(weights=None, device="cpu") -> ToyFeatureExtractor:
    """The extractor factory (`weights` and `device` unused: the committed toy CLIP runs on the CPU)."""
    return ToyFeatureExtractor()


def register() -> None:
    register_feature_extractor("toy", toy_feature_extractor)
