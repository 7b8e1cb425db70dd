"""Sample grids as PNG files."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import save_image


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Write images [N, 3, H, W] in [-1, 1] (or uint8) as one PNG grid of ``nrow`` per row, atomically."""
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {list(images.shape)}")
    x = images.detach().cpu()
    x = x.float() / 255.0 if x.dtype == torch.uint8 else ((x.float() + 1.0) * 0.5).clamp(0.0, 1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_image(x, tmp, nrow=nrow, padding=2, format="png")
        tmp.replace(path)
    except BaseException:  # a folder in the way, a full disk: leave no half-written grid behind
        if tmp.is_file():
            tmp.unlink()
        raise
    return path
