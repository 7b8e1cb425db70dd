"""BatchStream: the batches (indices, flips, values) are those of the original host-side stream,
wherever the images live, across epochs, ranks, accumulation and a resume."""

from __future__ import annotations

import pytest
import torch

from akod_ray.data.parquet import to_model_range
from akod_ray.data.stream import BatchStream


def uint8_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


class HostStream:
    """The stream as it was before the images could move to the device (commit a96f99e): a
    generator per batch for the flips and a masked in-place flip on the host."""

    def __init__(self, images, batch_size, rank=0, world_size=1, grad_accum=1, seed=0, hflip=True):
        self.images, self.batch_size, self.rank, self.world_size = images, batch_size, rank, world_size
        self.micro = batch_size // (world_size * grad_accum)
        self.seed, self.hflip, self.epoch, self.offset = seed, hflip, 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch):
        return torch.randperm(self.images.shape[0], generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def next(self):
        if self.offset + self.batch_size > self._perm.shape[0]:
            self.epoch, self.offset = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        share = self.batch_size // self.world_size
        start = self.offset + self.rank * share
        idx = self._perm[start:start + share]
        self.offset += self.batch_size
        x = to_model_range(self.images[idx])
        if self.hflip:
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.offset, self.rank)) & 0x7FFFFFFF)
            flip = torch.rand(x.shape[0], generator=g) < 0.5
            x[flip] = x[flip].flip(-1)
        return list(x.split(self.micro))


@pytest.mark.parametrize("rank, world_size, grad_accum, hflip", [(0, 1, 1, True), (1, 2, 2, True), (0, 2, 1, False)])
def test_batches_are_the_host_streams_across_epochs(rank, world_size, grad_accum, hflip):
    images = uint8_images(37)  # 4 batches of 8 an epoch, a ragged tail of 5 dropped
    new = BatchStream(images, 8, rank, world_size, grad_accum, seed=3, hflip=hflip)
    old = HostStream(images, 8, rank, world_size, grad_accum, seed=3, hflip=hflip)
    for step in range(10):  # two and a half epochs
        a, b = new.next(), old.next()
        assert len(a) == len(b) == grad_accum
        for x, y in zip(a, b):
            assert torch.equal(x, y), f"step {step}"
    assert new.state_dict() == {"epoch": 2, "offset": 16}


def test_resume_mid_epoch_continues_the_same_batches():
    images = uint8_images(40)
    whole = BatchStream(images, 8, seed=1)
    seen = [whole.next()[0] for _ in range(7)]
    first = BatchStream(images, 8, seed=1)
    for _ in range(3):
        first.next()
    resumed = BatchStream(images, 8, seed=1)
    resumed.load_state_dict(first.state_dict())
    for k in range(3, 7):
        assert torch.equal(resumed.next()[0], seen[k])


def test_images_on_the_device_give_the_same_batches_there():
    """move_to keeps the images where the step runs; on this CPU-only machine the device is the CPU
    (a GPU check is in bench/gpu_train.py)."""
    images = uint8_images(24)
    stream = BatchStream(images, 8, seed=2)
    assert stream.move_to("cpu") is True and stream.images.device.type == "cpu"
    out = stream.next("cpu", channels_last=True)[0]
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, HostStream(images, 8, seed=2).next()[0])
    assert out.dtype == torch.float32 and out.min() >= -1 and out.max() <= 1
