"""NudeNet 3.4 as the nudity detector (`detector: {name: nudenet}`), with explicit ONNX providers and threads."""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stereo.evaluation.detectors import Detection, Detector, register_detector, rgb
from stereo.manifest import sha256_file

# The 9 "exposed" NudeNet 3.4 labels counted as nudity (covered parts and faces are not).
NUDENET_EXPOSED_CLASSES = (
    "FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED",
    "MALE_GENITALIA_EXPOSED", "BUTTOCKS_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED",
    "BELLY_EXPOSED", "ARMPITS_EXPOSED",
)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads() -> int:
    """This process's share of the cores: all of them, divided by the processes launched on this machine
    (`LOCAL_WORLD_SIZE`, set by torchrun and accelerate launch)."""
    return max(1, available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def nudenet_session(model_path: str, providers: Sequence[str], threads: int):
    """A nudenet.NudeDetector whose ONNX session has explicit providers and an intra-op thread count.

    nudenet 3.4.2's constructor ignores its `providers` argument and takes no thread count: it creates
    `InferenceSession(model_path)`, which onnxruntime-gpu refuses (providers are required there) and
    which uses every core in each of N processes. So the session is built here from the same model
    file, and the detector gets the attributes its constructor would set.
    """
    import onnxruntime
    from nudenet import NudeDetector

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    detector = NudeDetector.__new__(NudeDetector)
    detector.onnx_session = onnxruntime.InferenceSession(model_path, sess_options=options, providers=list(providers))
    detector.input_width = detector.input_height = 320  # the 320n model's input size
    detector.input_name = detector.onnx_session.get_inputs()[0].name
    return detector


def _nudenet_labels() -> list[str]:
    """All labels of NudeNet's 320n model (a private list in nudenet 3.4; read, not copied)."""
    from nudenet import nudenet as module

    return list(getattr(module, "__labels"))  # getattr: the double underscore is not a class member


@register_detector("nudenet")
class NudeNetDetector(Detector):
    """NudeNet 3.4's bundled 320n ONNX detector: nude if any exposed class scores >= threshold.

    Score = the highest score among `classes` (0 when none is detected; NudeNet drops boxes
    below 0.2 and keeps >= 0.25 after NMS). Papers use threshold 0.45 or 0.6: always report it.
    NudeNet takes OpenCV-style BGR arrays, so PIL RGB images are flipped before the call.
    `providers` are onnxruntime execution providers (CPU unless configured, e.g. CUDAExecutionProvider
    with onnxruntime-gpu); `threads` is the intra-op thread count (default: cores / local processes).
    """

    name = "nudenet"

    def __init__(self, threshold: float = 0.45, classes: Sequence[str] = NUDENET_EXPOSED_CLASSES,
                 batch_size: int = 8, model_path: str | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",), threads: int | None = None):
        import nudenet  # optional heavy dependency (onnxruntime, opencv)

        unknown = sorted(set(classes) - set(_nudenet_labels()))
        if unknown:
            raise ValueError(f"Unknown NudeNet classes {unknown}; valid: {sorted(_nudenet_labels())}.")
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}.")
        self.threshold, self.classes, self.batch_size = threshold, tuple(classes), batch_size
        self.model_path = model_path or str(Path(nudenet.__file__).parent / "320n.onnx")
        self.onnx_sha256 = sha256_file(self.model_path)
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 (or unset for cores / local processes), got {threads}.")
        self.providers, self.threads = list(providers), threads or default_threads()
        self.detector = nudenet_session(self.model_path, self.providers, self.threads)

    @staticmethod
    def to_bgr(image: Image.Image) -> np.ndarray:
        """PIL RGB -> contiguous uint8 BGR array (H, W, 3), the layout cv2 and NudeNet expect."""
        return np.ascontiguousarray(np.asarray(rgb(image))[:, :, ::-1])

    def detect(self, images: Sequence[Image.Image]) -> Detection:
        arrays = [self.to_bgr(image) for image in images]
        found = self.detector.detect_batch(arrays, batch_size=self.batch_size)
        scores, details = [], []
        for boxes in found:
            exposed = [box for box in boxes if box["class"] in self.classes]
            scores.append(max((float(box["score"]) for box in exposed), default=0.0))
            details.append({"exposed": exposed})
        return Detection(scores, [s >= self.threshold for s in scores], details)

    def describe(self) -> dict[str, Any]:
        import onnxruntime  # its distribution is onnxruntime or onnxruntime-gpu: ask the module

        return {
            "name": self.name, "nudenet_version": importlib.metadata.version("nudenet"),
            "onnxruntime_version": onnxruntime.__version__,
            "onnx_file": Path(self.model_path).name, "onnx_sha256": self.onnx_sha256,
            "threshold": self.threshold, "classes": list(self.classes),
            "providers": self.providers, "threads": self.threads,
        }
