"""Deterministic, resumable batches for data-parallel training.

Every worker holds the same uint8 images and walks the same seeded permutation of them;
at each optimizer step the global batch is the next ``batch_size`` indices, and worker r
takes its own slice of it. The position (epoch, offset) is the same on every worker and
goes into checkpoints, so a resumed run neither repeats nor skips a batch.

The images can live on the accelerator (:meth:`BatchStream.move_to`; CIFAR-10 as uint8 is
150 MB): then a batch is gathered, scaled and flipped there, and a step copies nothing from
the host. The permutation and this worker's flips are drawn on the host once per epoch (the
same seeded draws wherever the images are) and copied over in one transfer.
"""

from __future__ import annotations

import torch

from akod_ray.data.parquet import to_model_range

DEVICE_SHARE = 0.25  # move_to keeps the images on a GPU when they take at most this share of its free memory


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
        self._epoch_tables: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (epoch, perm, flips) on the images' device

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.images.shape[0], generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def _flips(self, epoch: int, offset_after: int, n: int) -> torch.Tensor:
        """Random horizontal flips of one batch, seeded by the position so resumes are exact."""
        g = torch.Generator().manual_seed(hash((self.seed, epoch, offset_after, self.rank)) & 0x7FFFFFFF)
        return torch.rand(n, generator=g) < 0.5

    def move_to(self, device: torch.device | str, max_share: float = DEVICE_SHARE) -> bool:
        """Keep the images on ``device`` when they fit (at most ``max_share`` of its free memory);
        returns whether they are there. The batches stay exactly the same."""
        device = torch.device(device)
        if self.images.device == device:
            return True
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            if self.images.numel() * self.images.element_size() > max_share * free:
                return False
        self.images = self.images.to(device)
        self._epoch_tables = None
        return True

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._perm = self._permutation(self.epoch)

    def next_indices(self) -> torch.Tensor:
        """This worker's indices of the next global batch, and advance the shared position."""
        start = self._advance()
        return self._perm[start:start + self.batch_size // self.world_size]

    def _advance(self) -> int:
        """Move to the next global batch; returns where this worker's share starts in the permutation."""
        if self.offset + self.batch_size > self._perm.shape[0]:  # drop the ragged tail of an epoch
            self.epoch += 1
            self.offset = 0
            self._perm = self._permutation(self.epoch)
        start = self.offset + self.rank * (self.batch_size // self.world_size)
        self.offset += self.batch_size
        return start

    def peek(self, offsets: list[int], n: int) -> list[torch.Tensor]:
        """The first ``n`` images (uint8, as stored: unflipped) of this worker's share of the batches ``offsets``
        steps ahead (0: the next batch), without moving: what :meth:`next` will return then, up to flips."""
        if not offsets:
            return []
        epoch, offset, perm = self.epoch, self.offset, self._perm
        share = self.batch_size // self.world_size
        want, out = set(offsets), {}
        for k in range(max(offsets) + 1):
            if offset + self.batch_size > perm.shape[0]:
                epoch, offset, perm = epoch + 1, 0, self._permutation(epoch + 1)
            start = offset + self.rank * share
            offset += self.batch_size
            if k in want:
                out[k] = self.images[perm[start:start + min(n, share)].to(self.images.device)].cpu()
        return [out[k] for k in offsets]

    def pool(self, n: int, seed: int) -> torch.Tensor:
        """A fixed, seeded subset of ``n`` training images (uint8): the same on every worker."""
        idx = torch.randperm(self.images.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
        return self.images[idx.to(self.images.device)].cpu()

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This epoch's permutation and this worker's flips ([batches, share]), on the images' device."""
        if self._epoch_tables is None or self._epoch_tables[0] != self.epoch:
            share = self.batch_size // self.world_size
            batches = self._perm.shape[0] // self.batch_size
            if self.hflip:
                flips = torch.stack([self._flips(self.epoch, (b + 1) * self.batch_size, share) for b in range(batches)])
            else:
                flips = torch.zeros(batches, share, dtype=torch.bool)
            dev, perm = self.images.device, self._perm
            if dev.type == "cuda":  # pinned: the copy runs beside the step instead of waiting for the device
                perm, flips = perm.pin_memory(), flips.pin_memory()
            self._epoch_tables = (self.epoch, perm.to(dev, non_blocking=True), flips.to(dev, non_blocking=True))
        return self._epoch_tables[1], self._epoch_tables[2]

    def next(self, device: torch.device | str = "cpu", channels_last: bool = False) -> list[torch.Tensor]:
        """This worker's micro-batches of the next global batch, as float [-1, 1] on ``device``.

        Gathered where the images are (no host synchronization when that is the accelerator),
        then moved to ``device`` if it is elsewhere."""
        start = self._advance()
        perm, flips = self._tables()
        share = self.batch_size // self.world_size
        x = to_model_range(self.images[perm[start:start + share]])
        flip = flips[(self.offset - self.batch_size) // self.batch_size]
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return list(x.split(self.micro))
