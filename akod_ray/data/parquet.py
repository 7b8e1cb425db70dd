"""Parquet image datasets: columns ``image`` (encoded PNG/JPEG bytes) and ``label`` (int).

A folder holds ``train.parquet`` and ``test.parquet``. Images are decoded once into a uint8
tensor [N, 3, H, W] in memory (CIFAR-10 train: 150 MB), which keeps the data path far
faster than the training step.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError

from akod_ray.errors import DataError

SPLITS = ("train", "test")
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "akod_ray" / "cifar10"


def resolve_data_dir(flag: str | None = None, configured: str | None = None, download: bool = True) -> Path:
    """The data folder: the CLI flag, then the config's data.data_dir, then AKOD_DATA_DIR, then the cache.

    A missing cache is filled by downloading CIFAR-10 (``akod data prepare``); without network,
    the error says how to point at a local copy.
    """
    for source, value in (("--data-dir", flag), ("data.data_dir", configured), ("AKOD_DATA_DIR", os.environ.get("AKOD_DATA_DIR"))):
        if value:
            path = Path(value).expanduser()
            if not (path / "train.parquet").is_file():
                raise DataError(f"data folder {str(path)!r} (from {source}) has no train.parquet")
            return path
    if (CACHE_DIR / "train.parquet").is_file():
        return CACHE_DIR
    if not download:
        raise DataError(f"no CIFAR-10 data in {str(CACHE_DIR)!r}; set AKOD_DATA_DIR or --data-dir")
    from akod_ray.data.prepare import prepare_cifar10

    try:
        return prepare_cifar10(CACHE_DIR)
    except OSError as e:
        raise DataError(
            f"CIFAR-10 is not in {str(CACHE_DIR)!r} and could not be downloaded ({e}). Point at a local copy in "
            "Parquet format with --data-dir DIR or AKOD_DATA_DIR=DIR (on machines without network: ../shared/data/cifar10)"
        ) from None


def _read_table(path: Path) -> pa.Table:
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    try:
        table = pq.read_table(path, columns=None)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
        raise DataError(f"data file {str(path)!r} is not a readable Parquet file: {e}") from None
    missing = {"image", "label"} - set(table.column_names)
    if missing:
        raise DataError(f"data file {str(path)!r} lacks column(s) {sorted(missing)}")
    return table


def decode_image(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{where}: cannot decode image: {e}") from None


def load_images(folder: str | Path, split: str = "train", count: int | None = None, seed: int = 0,
                return_labels: bool = False):
    """uint8 images [N, 3, H, W] of ``split``; ``count`` takes a seeded random subset (rows are
    sorted by label in CIFAR-10's files, so a prefix would be one class)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(folder) / f"{split}.parquet"
    table = _read_table(path)
    n = table.num_rows
    if count is not None and count < n:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort().values.numpy()
        table = table.take(pa.array(idx))
    blobs = table.column("image").to_pylist()
    images = np.stack([decode_image(b, f"{path}, row {i}") for i, b in enumerate(blobs)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    if return_labels:
        return x, torch.tensor(table.column("label").to_numpy().astype(np.int64))
    return x


def to_model_range(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return x_uint8.float().div_(127.5).sub_(1.0)


def write_parquet(path: str | Path, images: np.ndarray, labels: np.ndarray, fmt: str = "PNG") -> Path:
    """Write uint8 images [N, H, W, 3] and labels to ``path`` in this format (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blobs, index_in_class, seen = [], [], {}
    for im, lab in zip(images, labels):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format=fmt)
        blobs.append(buf.getvalue())
        index_in_class.append(seen.get(int(lab), 0))
        seen[int(lab)] = index_in_class[-1] + 1
    table = pa.table({
        "image": pa.array(blobs, type=pa.binary()),
        "label": pa.array(np.asarray(labels, dtype=np.int8)),
        "index_in_class": pa.array(np.asarray(index_in_class, dtype=np.int32)),
    })
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path
