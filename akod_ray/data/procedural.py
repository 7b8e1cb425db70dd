"""A procedural image dataset: deterministic from a seed, no files, for tests and demos.

Each image is a smooth random colour field (a few low-frequency sinusoids) with a filled
disc and a rectangle: structure at several scales, so local variance is informative.
"""

from __future__ import annotations

import math

import torch


def procedural_images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """uint8 [n, 3, size, size]; image i depends only on (seed, i)."""
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    coords = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    for i in range(n):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        r = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
        img = torch.zeros(3, size, size)
        for _ in range(3):  # low-frequency background
            fx, fy, ph = r(3) * torch.tensor([4.0, 4.0, 2 * math.pi])
            img += r(3, 1, 1) * torch.sin(2 * math.pi * (fx * xx + fy * yy) + ph)
        cx, cy, rad = r(3) * torch.tensor([1.0, 1.0, 0.3]) + torch.tensor([0.0, 0.0, 0.1])
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < rad**2
        img = torch.where(disc, r(3, 1, 1) * 3 - 1.5, img)
        x0, y0 = (r(2) * 0.7).tolist()
        box = (xx > x0) & (xx < x0 + 0.3) & (yy > y0) & (yy < y0 + 0.3)
        img = torch.where(box, r(3, 1, 1) * 3 - 1.5, img)
        out[i] = ((torch.tanh(img) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return out
