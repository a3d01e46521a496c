"""The embedded toy world: an "MNIST of concept erasure" that runs on a CPU.

Scenes of coloured shapes on grey backgrounds (`scenes`), a detector that reads them
(`detector`), a tiny CLIP (`clip`) and a small latent-diffusion StableDiffusionPipeline
(`diffusion`), all pretrained from a seed by `python -m stereo.toy.pretrain` and committed in
`stereo/toy/weights/`. Erasing "circle" or "red", attacking it back and checking that
"square" survives are all real and measurable here. See docs/toy_world.md.
"""

from __future__ import annotations

from pathlib import Path

TOY_WEIGHTS_DIR = Path(__file__).parent / "weights"
_HOW_TO_FIX = "run `python -m stereo.toy.pretrain` (about an hour on 2 CPU cores) to regenerate them"


def _require(path: Path) -> Path:
    """`path`, or the loaders' one error for missing weights (`ModelLoadError`) saying how to regenerate them."""
    from stereo.models.loading import ModelLoadError

    if not path.exists():
        raise ModelLoadError(f"toy weights missing: {path} does not exist; {_HOW_TO_FIX}")
    return path


def load_toy_pipeline(weights_dir: Path | str | None = None):
    """The toy StableDiffusionPipeline (fp32, CPU), loaded offline from the committed folder.

    The same loader as `model=toy` (`stereo.models.loading.load_pipeline`), with the same error when the
    weights are missing; `weights_dir` reads another folder (a regenerated world).
    """
    import torch

    from stereo.models.loading import load_pretrained

    path = _require(Path(weights_dir or TOY_WEIGHTS_DIR) / "pipeline")
    return load_pretrained(str(path), None, torch.float32)


def load_toy_clip(weights_dir: Path | str | None = None):
    """The toy CLIPModel (transformers format), loaded offline, in eval mode."""
    from transformers import CLIPModel

    path = _require(Path(weights_dir or TOY_WEIGHTS_DIR) / "clip")
    return CLIPModel.from_pretrained(path, local_files_only=True).eval()


def load_toy_detector(concept: str, threshold: float = 0.5, weights_dir: Path | str | None = None):
    """A `ToyDetector` for one concept (shape, colour, background or "{colour} {shape}")."""
    from stereo.toy.detector import ToyDetector

    weights = Path(weights_dir or TOY_WEIGHTS_DIR) / "detector.safetensors"
    return ToyDetector(concept, threshold=threshold, weights=weights)


__all__ = ["TOY_WEIGHTS_DIR", "load_toy_pipeline", "load_toy_clip", "load_toy_detector"]
