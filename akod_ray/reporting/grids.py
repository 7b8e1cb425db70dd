"""Sample grids as PNG files."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torchvision.utils import save_image

from akod_ray import storage
from akod_ray.storage import StoragePath


def save_grid(images: torch.Tensor, path: str | Path | StoragePath, nrow: int = 8) -> StoragePath:
    """Write images [N, 3, H, W] in [-1, 1] (or uint8) as one PNG grid of ``nrow`` per row, published whole
    (akod_ray/storage.py: a local folder or an object store)."""
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {list(images.shape)}")
    x = images.detach().cpu()
    x = x.float() / 255.0 if x.dtype == torch.uint8 else ((x.float() + 1.0) * 0.5).clamp(0.0, 1.0)
    buf = io.BytesIO()
    save_image(x, buf, nrow=nrow, padding=2, format="png")
    return storage.write_bytes(path, buf.getvalue())
