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

from akod_ray import storage
from akod_ray.config import IMAGE_SIZE
from akod_ray.errors import DataError
from akod_ray.storage import StoragePath, location

SPLITS = ("train", "test")
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "akod_ray" / "cifar10"


def resolve_data_dir(flag: str | None = None, configured: str | None = None, download: bool = True) -> StoragePath:
    """The data folder: the CLI flag, then the config's data.data_dir, then AKOD_DATA_DIR, then the cache.
    Each may be a folder or an object store prefix (``s3://bucket/cifar10``: akod_ray/storage.py).

    A missing cache is filled by downloading CIFAR-10 (``akod data prepare``); without network,
    the error says how to point at a local copy.
    """
    for source, value in (("--data-dir", flag), ("data.data_dir", configured), ("AKOD_DATA_DIR", os.environ.get("AKOD_DATA_DIR"))):
        if value:
            try:
                path = location(value).expanduser()
            except storage.StorageError as e:
                raise DataError(f"data folder (from {source}): {e}") from None
            storage.check_reachable(path, f"data folder (from {source})")
            if not storage.is_file(path / "train.parquet"):
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


def _read_table(path: StoragePath, columns: list[str] | None = None) -> pa.Table:
    """The file's table, with its schema checked: a binary ``image`` column and an integer ``label``
    column without nulls, and at least one row."""
    if not storage.is_file(path):
        raise DataError(f"data file {str(path)!r} does not exist" if not storage.exists(path)
                        else f"data file {str(path)!r} is not a file")
    try:
        if storage.is_remote(path):
            fs, fs_path = storage.fs_and_path(path)
            table = pq.read_table(fs_path, columns=columns, filesystem=fs)
        else:
            table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"data file {str(path)!r} is not a readable Parquet file: {_first_line(e)}") from None
    check_schema(path, table.schema)
    if table.num_rows == 0:
        raise DataError(f"data file {str(path)!r} has no rows")
    for name in ("image", "label"):
        if name in table.column_names and table.column(name).null_count:
            raise DataError(f"data file {str(path)!r}: column '{name}' has {table.column(name).null_count} null value(s)")
    return table


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def check_schema(path: StoragePath, schema: pa.Schema) -> None:
    missing = {"image", "label"} - set(schema.names)
    if missing:
        raise DataError(f"data file {str(path)!r} lacks column(s) {sorted(missing)}")
    image, label = schema.field("image").type, schema.field("label").type
    if not (pa.types.is_binary(image) or pa.types.is_large_binary(image)):
        raise DataError(f"data file {str(path)!r}: column 'image' must hold encoded image bytes (binary), got {image}")
    if not pa.types.is_integer(label):
        raise DataError(f"data file {str(path)!r}: column 'label' must hold integers, got {label}")


def subset_indices(n: int, count: int | None, seed: int) -> np.ndarray | None:
    """The sorted rows of a seeded random subset of ``count`` of ``n`` rows; None for all of them
    (rows are sorted by label in CIFAR-10's files, so a prefix would be one class)."""
    if count is None or count >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort().values.numpy()


def decode_image(data: bytes, where: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 [H, W, 3] of one encoded image, of ``size`` (width, height) when given."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            x = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, TypeError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: cannot decode image: {_first_line(e)}") from None
    if size is not None and x.shape[:2] != (size[1], size[0]):
        raise DataError(f"{where}: image is {x.shape[1]}x{x.shape[0]}, every image must be {size[0]}x{size[1]}")
    return x


def inspect_split(folder: str | Path, split: str, count: int | None = None, seed: int = 0) -> int:
    """Check a split the way :func:`load_images` will read it for training, without decoding: the
    schema, the row count, and the size of every selected image (IMAGE_SIZE square) from its header.
    Returns the file's row count.

    The driver calls this before Ray starts, so a wrong file fails in one line and not in a worker."""
    path = location(folder) / f"{split}.parquet"
    table = _read_table(path, ["image", "label"])
    idx = subset_indices(table.num_rows, count, seed)
    column = table.column("image") if idx is None else table.column("image").take(pa.array(idx))
    for i, blob in enumerate(column.to_pylist()):
        row = i if idx is None else int(idx[i])
        try:
            with Image.open(io.BytesIO(blob)) as im:
                size = im.size
        except (UnidentifiedImageError, OSError, ValueError, TypeError) as e:
            raise DataError(f"{path}, row {row}: cannot decode image: {_first_line(e)}") from None
        if size != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(f"{path}, row {row}: image is {size[0]}x{size[1]}, every image must be {IMAGE_SIZE}x{IMAGE_SIZE}")
    return table.num_rows


def load_images(folder: str | Path, split: str = "train", count: int | None = None, seed: int = 0,
                return_labels: bool = False, size: int | None = None):
    """uint8 images [N, 3, H, W] of ``split``; ``count`` takes a seeded random subset (:func:`subset_indices`).

    Every image must have the size of the first one, or ``size`` x ``size`` when given (training: IMAGE_SIZE)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = location(folder) / f"{split}.parquet"
    table = _read_table(path)
    idx = subset_indices(table.num_rows, count, seed)
    if idx is not None:
        table = table.take(pa.array(idx))
    blobs = table.column("image").to_pylist()
    rows = range(len(blobs)) if idx is None else [int(i) for i in idx]
    first = decode_image(blobs[0], f"{path}, row {rows[0]}", (size, size) if size else None)
    hw = (first.shape[1], first.shape[0])
    images = np.stack([first] + [decode_image(b, f"{path}, row {r}", hw) for b, r in zip(blobs[1:], rows[1:])])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    if return_labels:
        return x, torch.tensor(table.column("label").to_numpy().astype(np.int64))
    return x


def to_model_range(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return x_uint8.float().div_(127.5).sub_(1.0)


def write_parquet(path: str | Path, images: np.ndarray, labels: np.ndarray, fmt: str = "PNG",
                  progress_desc: str | None = None) -> Path:
    """Write uint8 images [N, H, W, 3] and labels to ``path`` in this format (atomically); ``progress_desc``:
    show the encoding's progress under that name."""
    from akod_ray.progress import progress

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blobs, index_in_class, seen = [], [], {}
    with progress(progress_desc, len(images)) as bar:
        for im, lab in zip(images, labels):
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format=fmt)
            blobs.append(buf.getvalue())
            index_in_class.append(seen.get(int(lab), 0))
            seen[int(lab)] = index_in_class[-1] + 1
            bar.update(1)
    table = pa.table({
        "image": pa.array(blobs, type=pa.binary()),
        "label": pa.array(np.asarray(labels, dtype=np.int8)),
        "index_in_class": pa.array(np.asarray(index_in_class, dtype=np.int32)),
    })
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path
