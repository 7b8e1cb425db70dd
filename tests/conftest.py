"""Shared fixtures for the core tests: the CIFAR-10 folder, tiny model configs, test models."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from akod_ray.config import ModelConfig
from akod_ray.diffusion.process import DiffusionProcess

from ray_helpers import CIFAR_DIR, REPO  # noqa: F401  (one definition of the repo and data paths)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a test that takes more than ~30 s on two CPU cores")


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """The offline CIFAR-10 copy in Parquet format (../shared/data/cifar10 from the repo root)."""
    if not (CIFAR_DIR / "train.parquet").is_file() or not (CIFAR_DIR / "test.parquet").is_file():
        pytest.skip(f"CIFAR-10 Parquet copy not found at {CIFAR_DIR} (expected train.parquet and test.parquet)")
    return CIFAR_DIR


@contextlib.contextmanager
def _one_torch_thread():
    """One intra-op thread for CPU-heavy tests: on a small machine shared with other jobs, two
    spinning OpenMP threads were measured ten times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def torch_single_thread():
    """One torch thread for one test (see :func:`_one_torch_thread`)."""
    with _one_torch_thread():
        yield


@pytest.fixture(scope="module")
def torch_single_thread_module():
    """One torch thread for a whole module, module-scoped fixtures included; use it with
    ``pytestmark = pytest.mark.usefixtures("torch_single_thread_module")``."""
    with _one_torch_thread():
        yield


@pytest.fixture
def tiny_model_config() -> ModelConfig:
    """The smallest U-Net the config allows to be useful: 4 levels of width 8-16, attention at 16x16."""
    return ModelConfig(channels=(8, 8, 16, 16), bottleneck_channels=16, num_res_blocks=1,
                       attention_resolutions=(16,), dropout=0.0, msfi=True, beta_modulation=True)


def _perturb_zero_init(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Give every all-zero parameter (zero-initialized output layers, biases) small random values.

    At their true init the U-Net's residual branches, the MSFI and the output layer are the
    identity or zero, which would hide any dependence of the output on its inputs.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture
def perturb_zero_init():
    return _perturb_zero_init


class OracleModel(nn.Module):
    """The ideal denoiser for one known x_0: eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t).

    It gets only (x_t, cond) like the U-Net, so it recovers the step t from cond's log-SNR
    column (the nearest entry of the process's float32 log-SNR table).
    """

    def __init__(self, process: DiffusionProcess, x0: torch.Tensor):
        super().__init__()
        self.process = process
        self.x0 = x0
        self.table = process.noise_cond(torch.arange(process.T))[:, 0]
        self.calls: list[int] = []

    def step_of(self, cond: torch.Tensor) -> torch.Tensor:
        t = (cond[:, 0:1] - self.table[None, :]).abs().argmin(dim=1)
        assert torch.equal(self.process.noise_cond(t), cond), "cond is not a row of the process's table"
        return t

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t = self.step_of(cond)
        self.calls.append(int(t[0]))
        return self.process.predict_eps_from_x0(x, t, self.x0.to(x.dtype))


@pytest.fixture
def oracle_model():
    return OracleModel
