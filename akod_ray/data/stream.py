"""Deterministic, resumable batches for data-parallel training.

Every worker holds the same uint8 images and walks the same seeded permutation of them;
at each optimizer step the global batch is the next ``batch_size`` indices, and worker r
takes its own slice of it. The position (epoch, offset) is the same on every worker and
goes into checkpoints, so a resumed run neither repeats nor skips a batch.
"""

from __future__ import annotations

import torch

from akod_ray.data.parquet import to_model_range


class BatchStream:
    def __init__(self, images: torch.Tensor, batch_size: int, rank: int = 0, world_size: int = 1,
                 grad_accum: int = 1, seed: int = 0, hflip: bool = True):
        if batch_size % (world_size * grad_accum):
            raise ValueError(f"train.batch_size {batch_size} is not divisible by workers x grad_accum = {world_size * grad_accum}")
        if images.shape[0] < batch_size:
            raise ValueError(f"the training set has {images.shape[0]} images, fewer than one batch of train.batch_size={batch_size}")
        self.images = images
        self.batch_size = batch_size
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.micro = batch_size // (world_size * grad_accum)
        self.seed = seed
        self.hflip = hflip
        self.epoch = 0
        self.offset = 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.images.shape[0], generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._perm = self._permutation(self.epoch)

    def next_indices(self) -> torch.Tensor:
        """This worker's indices of the next global batch, and advance the shared position."""
        if self.offset + self.batch_size > self._perm.shape[0]:  # drop the ragged tail of an epoch
            self.epoch += 1
            self.offset = 0
            self._perm = self._permutation(self.epoch)
        share = self.batch_size // self.world_size
        start = self.offset + self.rank * share
        idx = self._perm[start:start + share]
        self.offset += self.batch_size
        return idx

    def next(self, device: torch.device | str = "cpu", channels_last: bool = False) -> list[torch.Tensor]:
        """This worker's micro-batches of the next global batch, as float [-1, 1] on ``device``."""
        idx = self.next_indices()
        x = to_model_range(self.images[idx])
        if self.hflip:  # random horizontal flips, seeded by the position so resumes are exact
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.offset, self.rank)) & 0x7FFFFFFF)
            flip = torch.rand(x.shape[0], generator=g) < 0.5
            x[flip] = x[flip].flip(-1)
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return list(x.split(self.micro))
