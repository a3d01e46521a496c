"""The FID Inception-v3 network (TF "inception-2015-12-05", as ported by pytorch-fid), in plain torch.

Reportable FID numbers use exactly this network and its weights file
`pt_inception-2015-12-05-6726825d.pth`. Its layers are torchvision's Inception-v3 (Szegedy et
al. 2016) with three differences that reproduce the TensorFlow graph:
- the average-pool branches of the A, C and first E blocks ignore padded zeros
  (`count_include_pad=False`);
- the last E block (`Mixed_7c`) pools its pool branch with a 3x3 *max* pool;
- the classifier has 1008 outputs (unused for FID).
Input: RGB in [0, 1], bilinearly resized to 299x299 and scaled to [-1, 1]; features are the
2048-d global average pool after `Mixed_7c`.

Weights load from a local file only (sha256-checked); nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from stereo.manifest import sha256_file

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
CONFIG_KEY = "evaluation.fid.inception_weights"
FEATURE_DIM = 2048


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU; submodule names `conv`/`bn` match the checkpoint."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average pool that, like TensorFlow, averages over real pixels only."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/c/d: 1x1, 5x5, double 3x3 and pool branches -> 224 + pool_features channels."""

    def __init__(self, in_ch: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(in_ch, 64, 1)
        self.branch5x5_1 = ConvBN(in_ch, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_ch, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_ch, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_same(x)),
        ], dim=1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35x35 -> 17x17, 288 -> 768 channels."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3 = ConvBN(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_ch, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class InceptionC(nn.Module):
    """Mixed_6b-e: factorised 7x7 convolutions (1x7 then 7x1) at 17x17, 768 channels."""

    def __init__(self, in_ch: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_ch, 192, 1)
        self.branch7x7_1 = ConvBN(in_ch, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_ch, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_ch, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = layer(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(_avg_pool_same(x))], dim=1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17x17 -> 8x8, 768 -> 1280 channels."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_ch, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_ch, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)
        ], dim=1)


class InceptionE(nn.Module):
    """Mixed_7b/c: expanded 1x3 / 3x1 branches at 8x8 -> 2048 channels.

    `pool="avg"` (Mixed_7b) or `"max"` (Mixed_7c: the TF FID graph max-pools here).
    """

    def __init__(self, in_ch: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}.")
        self.pool = pool
        self.branch1x1 = ConvBN(in_ch, 320, 1)
        self.branch3x3_1 = ConvBN(in_ch, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_ch, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_ch, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.pool == "avg":
            pooled = _avg_pool_same(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl),
            self.branch_pool(pooled),
        ], dim=1)


class FIDInceptionV3(nn.Module):
    """Images `(N, 3, H, W)` in [0, 1] -> pool features `(N, 2048)`. Attribute names = checkpoint keys."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, 1008)  # ImageNet logits of the TF graph; not used for FID

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB at any size -> 299x299 (bilinear, as pytorch-fid) in [-1, 1]."""
        images = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * images - 1

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed `(N, 3, 299, 299)` -> `(N, 2048)`."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))  # (N, 2048) global average pool

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(self.preprocess(images))


def _missing_weights_message(path: str | Path | None) -> str:
    where = "no path was given" if path is None else f"{path} does not exist"
    return (
        f"FID Inception weights not found ({where}). FID needs the file {FID_WEIGHTS_NAME} "
        f"(sha256 {FID_WEIGHTS_SHA256}); it is never downloaded automatically. Fetch it on a machine "
        f"with network from {FID_WEIGHTS_URL}, copy it here, and set the config key {CONFIG_KEY}=<path> "
        "(or pass weights_path=...)."
    )


def _is_batch_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")  # absent from older checkpoints; unused at eval


def load_fid_inception(
    weights_path: str | Path | None, expected_sha256: str = FID_WEIGHTS_SHA256
) -> FIDInceptionV3:
    """The FID Inception network with weights from a LOCAL file, checked by sha256, in eval mode."""
    if weights_path is None or not Path(weights_path).is_file():
        raise FileNotFoundError(_missing_weights_message(weights_path))
    actual = sha256_file(weights_path)
    if actual != expected_sha256:
        raise ValueError(
            f"{weights_path} has sha256 {actual}, expected {expected_sha256} ({FID_WEIGHTS_NAME}). "
            f"The file is corrupt or a different network; download it again from {FID_WEIGHTS_URL}."
        )
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model = FIDInceptionV3()
    expected = {k for k in model.state_dict() if not _is_batch_counter(k)}
    found = {k for k in state if not _is_batch_counter(k)}
    if expected != found:
        raise ValueError(
            f"{weights_path} does not have the FID Inception layout: missing keys "
            f"{sorted(expected - found)[:5]}, unexpected keys {sorted(found - expected)[:5]}."
        )
    model.load_state_dict(state, strict=False)  # only batch counters may be absent (checked above)
    return model.eval()


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W)


class InceptionFeatureExtractor:
    """`FeatureExtractor` with the FID Inception network: PIL images -> `(N, 2048)` float64."""

    name = "pt_inception-2015-12-05"

    def __init__(self, model: FIDInceptionV3, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.device = torch.device(device)

    @classmethod
    def from_file(cls, weights_path: str | Path | None, device: str | torch.device = "cpu"):
        return cls(load_fid_inception(weights_path), device)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        # Resize image by image so that a batch may mix sizes; F.interpolate is per image anyway.
        batch = torch.cat([FIDInceptionV3.preprocess(_to_tensor(im)) for im in images]).to(self.device)
        return self.model.features(batch).double().cpu().numpy()
