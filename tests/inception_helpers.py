"""Stand-in Inception weights in pytorch-fid's format (no download): the FID Inception architecture with seeded
random weights, saved as the state dict pytorch-fid's pt_inception-2015-12-05 file holds."""

from __future__ import annotations

from pathlib import Path

import torch


def standin_inception_weights(path: Path, seed: int = 0) -> Path:
    """Write the stand-in weights to ``path`` (about 95 MB: the real tensor names and shapes, random values)."""
    from akod_ray.evaluation import fid

    torch.manual_seed(seed)
    net = fid.fid_inception_architecture()
    for m in net.modules():  # He init keeps activations O(1) through 90+ layers (the default shrinks them ~1e-8)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
