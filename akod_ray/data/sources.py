"""The images a run trains and validates on, from its DataConfig."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from akod_ray.config import IMAGE_SIZE, Config
from akod_ray.data.parquet import load_images
from akod_ray.data.procedural import procedural_images
from akod_ray.errors import DataError


@dataclass
class TrainingData:
    train: torch.Tensor  # uint8 [N, 3, H, W], the same on every worker
    val: torch.Tensor  # uint8 [V, 3, H, W], held out (CIFAR-10's test split); each worker takes its share


def load_training_data(cfg: Config, data_dir: str | Path | None) -> TrainingData:
    d = cfg.data
    if d.source == "procedural":
        n = d.train_subset or 4096
        return TrainingData(procedural_images(n, seed=d.seed), procedural_images(d.val_size, seed=d.seed + 1))
    if data_dir is None:
        raise DataError("data.source=cifar10 needs a resolved data folder")
    train = load_images(data_dir, "train", count=d.train_subset, seed=d.seed, size=IMAGE_SIZE)
    val = load_images(data_dir, "test", count=d.val_size, seed=d.seed + 1, size=IMAGE_SIZE)
    return TrainingData(train, val)
