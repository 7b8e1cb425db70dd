"""Data: the Parquet CIFAR-10 folder, clear errors for bad files, the procedural set, the data path."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from akod_ray.data import parquet
from akod_ray.data.parquet import load_images, resolve_data_dir, to_model_range, write_parquet
from akod_ray.data.procedural import procedural_images
from akod_ray.errors import DataError


def random_images(n: int, seed: int = 0, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path):
    """A tiny dataset folder in the project's format."""
    write_parquet(tmp_path / "train.parquet", random_images(12), np.arange(12) % 4)
    write_parquet(tmp_path / "test.parquet", random_images(5, seed=1), np.arange(5) % 4)
    return tmp_path


# ----------------------------------------------------------------- CIFAR-10


def test_cifar10_subset(cifar_dir):
    x, y = load_images(cifar_dir, "train", count=64, seed=0, return_labels=True)
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.uint8
    assert y.shape == (64,) and y.dtype == torch.int64
    assert len(y.unique()) >= 6  # rows are sorted by label: a seeded random subset spans the classes
    assert 0 <= y.min() and y.max() <= 9
    assert x.float().std() > 30  # real images, not blank
    x2, y2 = load_images(cifar_dir, "train", count=64, seed=0, return_labels=True)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3 = load_images(cifar_dir, "train", count=64, seed=1)
    assert not torch.equal(x, x3)


def test_cifar10_test_split(cifar_dir):
    x = load_images(cifar_dir, "test", count=16, seed=0)
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.uint8
    m = to_model_range(x)
    assert m.dtype == torch.float32 and m.min() >= -1 and m.max() <= 1


def test_unknown_split_is_rejected(cifar_dir):
    with pytest.raises(ValueError, match="split must be one of"):
        load_images(cifar_dir, "val")


# ----------------------------------------------------------------- round trip and format


def test_write_parquet_load_images_round_trip_is_exact_for_png(tmp_path):
    images = random_images(10, size=32)
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    path = write_parquet(tmp_path / "train.parquet", images, labels)
    assert path.is_file() and not list(tmp_path.glob("*.tmp"))
    x, y = load_images(tmp_path, "train", return_labels=True)
    assert torch.equal(x, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert y.tolist() == labels.tolist()
    table = pq.read_table(path)
    assert table.column_names == ["image", "label", "index_in_class"]
    assert table.column("index_in_class").to_pylist() == [0, 0, 0, 1, 0, 0, 0, 0, 1, 1]
    # count >= N returns everything, in file order.
    assert torch.equal(load_images(tmp_path, "train", count=50), x)


def test_subset_is_sorted_rows_of_the_file(folder):
    full = load_images(folder, "train")
    sub = load_images(folder, "train", count=5, seed=3)
    idx = torch.randperm(12, generator=torch.Generator().manual_seed(3))[:5].sort().values
    assert torch.equal(sub, full[idx])


def test_to_model_range_endpoints():
    x = torch.tensor([0, 255, 128], dtype=torch.uint8)
    assert to_model_range(x).tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-7)


# ----------------------------------------------------------------- errors name the file


def test_missing_folder_or_file_raises_data_error_naming_the_file(tmp_path, folder):
    with pytest.raises(DataError, match=r"nowhere/train\.parquet.* does not exist"):
        load_images(tmp_path / "nowhere")
    (folder / "test.parquet").unlink()
    with pytest.raises(DataError, match=r"test\.parquet"):
        load_images(folder, "test")


def test_corrupt_parquet_raises_data_error_naming_the_file(tmp_path):
    (tmp_path / "train.parquet").write_bytes(b"PAR1 this is not a parquet file \x00\x01\x02" * 10)
    with pytest.raises(DataError, match=r"train\.parquet.*not a readable Parquet file"):
        load_images(tmp_path)


def test_truncated_parquet_raises_data_error(tmp_path, folder):
    data = (folder / "train.parquet").read_bytes()
    (tmp_path / "train.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"train\.parquet"):
        load_images(tmp_path)


def test_table_without_a_column_raises_data_error(tmp_path):
    pq.write_table(pa.table({"image": pa.array([b"x"], type=pa.binary())}), tmp_path / "train.parquet")
    with pytest.raises(DataError, match=r"train\.parquet.*lacks column\(s\) \['label'\]"):
        load_images(tmp_path)
    pq.write_table(pa.table({"pixels": [1], "target": [2]}), tmp_path / "train.parquet")
    with pytest.raises(DataError, match=r"\['image', 'label'\]"):
        load_images(tmp_path)


def test_undecodable_image_raises_data_error_naming_the_row(tmp_path):
    write_parquet(tmp_path / "train.parquet", random_images(3), np.zeros(3))
    table = pq.read_table(tmp_path / "train.parquet")
    blobs = table.column("image").to_pylist()
    blobs[1] = b"not an image"
    table = table.set_column(0, "image", pa.array(blobs, type=pa.binary()))
    pq.write_table(table, tmp_path / "train.parquet")
    with pytest.raises(DataError, match=r"train\.parquet, row 1: cannot decode image"):
        load_images(tmp_path)


# ----------------------------------------------------------------- procedural


def test_procedural_images_are_deterministic_per_seed_and_index():
    a = procedural_images(6, seed=3, size=16)
    assert a.shape == (6, 3, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, procedural_images(6, seed=3, size=16))
    assert torch.equal(a[:4], procedural_images(4, seed=3, size=16))  # image i depends on (seed, i) only
    b = procedural_images(6, seed=4, size=16)
    assert all(not torch.equal(a[i], b[i]) for i in range(6))
    assert all(not torch.equal(a[0], a[i]) for i in range(1, 6))
    assert a.float().std() > 20  # structure, not a flat field


def test_procedural_images_default_size():
    assert procedural_images(2).shape == (2, 3, 32, 32)


# ----------------------------------------------------------------- resolve_data_dir


def test_resolve_data_dir_order(tmp_path, monkeypatch):
    dirs = {}
    for name in ("flag", "configured", "env"):
        d = tmp_path / name
        d.mkdir()
        (d / "train.parquet").write_bytes(b"")
        dirs[name] = d
    monkeypatch.setenv("AKOD_DATA_DIR", str(dirs["env"]))
    assert resolve_data_dir(str(dirs["flag"]), str(dirs["configured"])) == dirs["flag"]
    assert resolve_data_dir(None, str(dirs["configured"])) == dirs["configured"]
    assert resolve_data_dir(None, None) == dirs["env"]
    monkeypatch.delenv("AKOD_DATA_DIR")
    monkeypatch.setattr(parquet, "CACHE_DIR", dirs["configured"])
    assert resolve_data_dir(None, None) == dirs["configured"]  # then the cache


def test_resolve_data_dir_refuses_a_folder_without_train_parquet(tmp_path, monkeypatch):
    monkeypatch.delenv("AKOD_DATA_DIR", raising=False)
    with pytest.raises(DataError, match=r"from --data-dir\) has no train.parquet"):
        resolve_data_dir(str(tmp_path), None)
    with pytest.raises(DataError, match=r"from data.data_dir\)"):
        resolve_data_dir(None, str(tmp_path))
    monkeypatch.setenv("AKOD_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataError, match=r"missing.*from AKOD_DATA_DIR\)"):
        resolve_data_dir()


def test_resolve_data_dir_without_data_or_download(tmp_path, monkeypatch):
    monkeypatch.delenv("AKOD_DATA_DIR", raising=False)
    monkeypatch.setattr(parquet, "CACHE_DIR", tmp_path / "cache")
    with pytest.raises(DataError, match="AKOD_DATA_DIR or --data-dir"):
        resolve_data_dir(download=False)


def test_resolve_data_dir_explains_a_failed_download(tmp_path, monkeypatch):
    monkeypatch.delenv("AKOD_DATA_DIR", raising=False)
    monkeypatch.setattr(parquet, "CACHE_DIR", tmp_path / "cache")
    import akod_ray.data.prepare as prepare

    def offline(out, download_root=None):
        raise OSError("network unreachable")

    monkeypatch.setattr(prepare, "prepare_cifar10", offline)
    with pytest.raises(DataError, match=r"could not be downloaded \(network unreachable\).*shared/data/cifar10"):
        resolve_data_dir()


def test_resolved_shared_folder_loads(cifar_dir, monkeypatch):
    monkeypatch.setenv("AKOD_DATA_DIR", str(cifar_dir))
    assert resolve_data_dir() == cifar_dir
