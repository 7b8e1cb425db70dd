"""The CIFAR-10 classifier whose penultimate features define the offline FID (``fid_c10``).

A small ResNet in the style of Page's ResNet-9 (DAWNBench): conv-BN-ReLU stages with max
pooling and two residual blocks, at half width so that the shipped fp16 weights stay a few
MB and a CPU thread trains it in under an hour. The 8*width-dimensional global-average-pooled
features (256-d at width 32) are the feature space of ``fid_c10``; the final linear layer is
only there to train them. The trained weights live in ``weights/c10_classifier.pt`` with a
JSON record of how they were made (``train_classifier.py``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from akod_ray.errors import CheckpointError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "c10_classifier.pt"
DEFAULT_C10_REFERENCE = WEIGHTS_DIR / "c10_train_stats.npz"  # fid_c10 statistics of CIFAR-10 train under DEFAULT_WEIGHTS

# Channel statistics of CIFAR-10 on [0, 1] pixels; the net normalizes its own input.
C10_MEAN = (0.4914, 0.4822, 0.4465)
C10_STD = (0.2470, 0.2435, 0.2616)


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c), conv_bn(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class C10FeatureNet(nn.Module):
    """ResNet-9-style classifier; input images in [-1, 1], NCHW, 32x32.

    Stages (width w): prep w @32 -> 2w @16 + residual -> 4w @8 -> 8w @4 + residual ->
    global average pool (the features, 8w-d) -> linear to 10 classes.
    """

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.width = width
        self.weights_id = "unsaved"  # set by load_feature_net to the weights file's sha256 prefix
        w = width
        self.register_buffer("mean", torch.tensor(C10_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(C10_STD).view(1, 3, 1, 1), persistent=False)
        self.trunk = nn.Sequential(
            conv_bn(3, w),
            conv_bn(w, 2 * w), nn.MaxPool2d(2), Residual(2 * w),
            conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
            conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), Residual(8 * w),
        )
        self.fc = nn.Linear(8 * w, num_classes)

    @property
    def feature_dim(self) -> int:
        return 8 * self.width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, 32, 32] in [-1, 1] -> [N, 8w] penultimate features."""
        x = ((x + 1) * 0.5 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return F.adaptive_avg_pool2d(self.trunk(x), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def load_feature_net(path: str | Path | None = None, device: str | torch.device = "cpu") -> C10FeatureNet:
    """The trained classifier in eval mode (float32), from ``path`` or the shipped weights.

    The file holds ``{"width": int, "state_dict": {name: tensor}}`` (fp16 tensors), loaded
    with ``torch.load(weights_only=True)``.
    """
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise CheckpointError(
            f"fid_c10 classifier weights {str(path)!r} do not exist; train them with "
            "`python -m akod_ray.evaluation.train_classifier --data-dir DIR --out PATH`"
        )
    from akod_ray.training.checkpoint import LOAD_ERRORS, load_plain, torch_load_error

    try:
        blob = load_plain(path)
        net = C10FeatureNet(width=int(blob["width"]))
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()})
    except LOAD_ERRORS as e:
        raise CheckpointError(f"fid_c10 classifier weights {str(path)!r} are corrupt: {torch_load_error(e)}") from None
    # Statistics name the weights they were computed with, so that fid_c10 values of different
    # classifiers never get compared.
    net.weights_id = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    # channels_last: the fast memory format for these convolutions on CPU (and GPU).
    return net.to(device, memory_format=torch.channels_last).eval()


def weights_record(path: str | Path | None = None) -> dict:
    """The JSON record beside the weights (test accuracy, epochs, seed, command, train time)."""
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    record = path.with_suffix(".json")
    if not record.is_file():
        return {}
    return json.loads(record.read_text())
