"""`akod data prepare cifar10`: the official CIFAR-10 download (torchvision) in this project's Parquet format."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from akod_ray.data.parquet import write_parquet


def prepare_cifar10(out: str | Path, download_root: str | Path | None = None) -> Path:
    """Download CIFAR-10 with torchvision and write ``out/train.parquet`` and ``out/test.parquet`` (PNG bytes)."""
    from torchvision.datasets import CIFAR10

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(download_root) if download_root else Path(tmp)
        for split, train in (("train", True), ("test", False)):
            ds = CIFAR10(root=str(root), train=train, download=True)
            labels = np.asarray(ds.targets)
            order = np.lexsort((np.arange(len(labels)), labels))  # sorted by (label, index), like the shared copy
            write_parquet(out / f"{split}.parquet", ds.data[order], labels[order], fmt="PNG",
                          progress_desc=f"CIFAR-10 {split} -> Parquet")
    return out
