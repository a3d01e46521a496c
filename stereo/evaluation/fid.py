"""Fréchet distance between feature distributions (FID, Heusel et al. 2017), in float64.

    FID = ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2))

`S_a S_b` is not symmetric, so the usual `scipy.linalg.sqrtm(S_a @ S_b)` can return complex
values or fail on near-singular covariances. We use the symmetric formulation instead:
`M = S_a^(1/2) S_b S_a^(1/2)` is PSD with the eigenvalues of `S_a S_b`, so
`Tr((S_a S_b)^(1/2)) = Tr(M^(1/2))`; and since `M = X X^T` with `X = S_a^(1/2) S_b^(1/2)`,
`Tr(M^(1/2))` is the sum of the singular values of X. Square roots of the symmetric S come from
`eigh` (real, negative rounding clipped to 0); summing singular values of X, rather than square
roots of M's eigenvalues, avoids taking square roots of rounding noise, so FID(A, A) is ~1e-13
even for singular covariances (N < D), where sqrt-of-eigenvalues leaves ~1e-6.

Any callable `images -> (N, D) array` is a feature extractor (`FeatureExtractor`): the FID
Inception network (`stereo.evaluation.inception`) for reportable numbers, a toy extractor for
tests. Numbers from different extractors or implementations are not comparable, so every
report carries the extractor name, this implementation's name and both N.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from stereo.generation import open_rgb
from stereo.parallel import gather_or_raise, is_main, on_main, rank_and_world

IMPLEMENTATION = "stereo-fid v1 (float64, eigh square roots, nuclear norm of S_a^1/2 S_b^1/2)"
STATS_SUFFIXES = (".npz", ".safetensors")


class FeatureExtractor(Protocol):
    """Images -> features `(N, D)`. `name` identifies the network + weights (it keys the cache)."""

    name: str

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray: ...


@dataclass
class FeatureStats:
    """Gaussian summary of a feature set: mean `(D,)`, covariance `(D, D)` (ddof = 1), count N."""

    mean: np.ndarray
    cov: np.ndarray
    n: int

    @classmethod
    def from_features(cls, features: np.ndarray) -> FeatureStats:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(
                f"FID needs features of shape (N, D) with N >= 2, got {features.shape}; "
                "pass at least two images."
            )
        return cls(features.mean(axis=0), np.cov(features, rowvar=False), features.shape[0])

    def save(self, path: str | Path) -> Path:
        """Write to `.npz` or `.safetensors` (chosen by the suffix)."""
        path = Path(path)
        arrays = {"mean": self.mean, "cov": self.cov, "n": np.array(self.n, dtype=np.int64)}
        path.parent.mkdir(parents=True, exist_ok=True)
        if _stats_format(path) == ".npz":
            with open(path, "wb") as f:  # a file object stops numpy appending a second ".npz"
                np.savez(f, **arrays)
        else:
            from safetensors.numpy import save_file

            save_file(arrays, str(path))
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Feature statistics file {path} does not exist.")
        if _stats_format(path) == ".npz":
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        else:
            from safetensors.numpy import load_file

            arrays = load_file(str(path))
        missing = {"mean", "cov", "n"} - set(arrays)
        if missing:
            raise ValueError(f"{path} is not a FeatureStats file: missing arrays {sorted(missing)}.")
        return cls(arrays["mean"].astype(np.float64), arrays["cov"].astype(np.float64), int(arrays["n"]))


def _stats_format(path: Path) -> str:
    if path.suffix not in STATS_SUFFIXES:
        raise ValueError(f"Unknown feature-statistics format {path.suffix!r} for {path}; "
                         f"valid suffixes: {list(STATS_SUFFIXES)}.")
    return path.suffix


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix by eigendecomposition (negative rounding noise -> 0)."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between N(mu_a, S_a) and N(mu_b, S_b) (Heusel et al. 2017, eq. 6)."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"Feature dimensions differ: {a.mean.shape[0]} vs {b.mean.shape[0]}; "
                         "both sets must come from the same feature extractor.")
    mu_a, mu_b = a.mean.astype(np.float64), b.mean.astype(np.float64)
    cov_a, cov_b = a.cov.astype(np.float64), b.cov.astype(np.float64)
    # Tr((S_a S_b)^1/2) = Tr((S_a^1/2 S_b S_a^1/2)^1/2) = nuclear norm of S_a^1/2 S_b^1/2
    trace_sqrt = np.linalg.svd(_psd_sqrt(cov_a) @ _psd_sqrt(cov_b), compute_uv=False).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two raw feature sets `(N_a, D)` and `(N_b, D)`."""
    return frechet_distance(FeatureStats.from_features(features_a), FeatureStats.from_features(features_b))


def extract_features(
    images: Iterable[Image.Image], extractor: FeatureExtractor, batch_size: int = 50
) -> np.ndarray:
    """Run `extractor` over `images` in batches -> `(N, D)` float64."""
    batches, batch = [], []
    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            batches.append(np.asarray(extractor(batch), dtype=np.float64))
            batch = []
    if batch:
        batches.append(np.asarray(extractor(batch), dtype=np.float64))
    if not batches:
        raise ValueError("No images were given to extract features from.")
    return np.concatenate(batches)


def files_hash(paths: Sequence[str | Path]) -> str:
    """sha256 over the sorted (file name, content sha256) pairs: identifies a reference image set."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def reference_stats(
    paths: Sequence[str | Path], extractor: FeatureExtractor, cache_dir: str | Path | None = None,
    batch_size: int = 50, accelerator=None,
) -> FeatureStats:
    """FeatureStats of a reference image folder, cached under `cache_dir` by extractor + files hash.

    With an `accelerator` of several processes (every process must call this), process r extracts
    the features of images r, r + world, ... and every process gets the statistics of all of them,
    so tens of thousands of reference images do not keep the other GPUs waiting on one.
    """
    paths = sorted(Path(p) for p in paths)
    if not paths:
        raise ValueError("The reference set is empty: give at least two image files.")
    cache = None
    if cache_dir is not None:
        safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in extractor.name)
        cache = Path(cache_dir) / f"{safe_name}-{files_hash(paths)[:16]}.npz"
        # the main process decides for all: a process that saw no cache would extract and wait in the gather
        if on_main(cache.is_file, accelerator, share=True):
            return FeatureStats.load(cache)
    rank, world = rank_and_world(accelerator)
    mine = paths[rank::world]
    # an unreadable image raises on every process, not only on the one whose share holds it
    shares = gather_or_raise(  # share r holds images r, r + world, ...
        lambda: extract_features((open_rgb(p) for p in mine), extractor, batch_size) if mine else None, accelerator)
    ordered = np.empty((len(paths), next(s for s in shares if s is not None).shape[1]))
    for r, share in enumerate(shares):
        if share is not None:
            ordered[r::world] = share
    stats = FeatureStats.from_features(ordered)
    if cache is not None and is_main(accelerator):
        stats.save(cache)
    return stats


def fid_report(generated: FeatureStats, reference: FeatureStats, extractor_name: str) -> dict[str, Any]:
    """FID plus what makes it comparable: both N, the extractor and this implementation."""
    return {
        "fid": frechet_distance(generated, reference),
        "n_generated": generated.n,
        "n_reference": reference.n,
        "extractor": extractor_name,
        "implementation": IMPLEMENTATION,
    }


def compute_fid(
    images: Iterable[Image.Image], reference: FeatureStats, extractor: FeatureExtractor, batch_size: int = 50
) -> dict[str, Any]:
    """FID of generated `images` against cached `reference` statistics from the same extractor."""
    generated = FeatureStats.from_features(extract_features(images, extractor, batch_size))
    return fid_report(generated, reference, extractor.name)
