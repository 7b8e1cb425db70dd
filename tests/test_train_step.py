"""The pure train step, gradient accumulation, EMA, divergence checks, and a short real training run."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch

from akod_ray.config import ModelConfig
from akod_ray.data.parquet import load_images, to_model_range
from akod_ray.diffusion.dko import uniform_logsnr_betas
from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.diffusion.schedules import linear_betas
from akod_ray.errors import AkodError, TrainingDivergedError
from akod_ray.models.unet import UNet
from akod_ray.training.ema import EMA
from akod_ray.training.step import (
    ReferenceProtocol,
    StepOptions,
    check_finite,
    lr_at,
    make_optimizer,
    schedule_loss,
    train_step,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

LMAX, LMIN = 9.21, -10.13


def images(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def small_model(tiny_model_config, perturb_zero_init):
    torch.manual_seed(0)
    return perturb_zero_init(UNet(tiny_model_config, image_size=16))


class ZeroModel(torch.nn.Module):
    def forward(self, x, cond):
        return torch.zeros_like(x)


# ----------------------------------------------------------------- train_step


@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_two_micro_batches_equal_one_batch_of_their_concatenation(small_model, grad_clip):
    """With dropout 0, accumulating two equal micro-batches is one step on the concatenated batch
    (the same t and noise), compared through the SGD parameter update."""
    process = DiffusionProcess(linear_betas(1000))
    xa, xb = images(3, seed=1), images(3, seed=2)
    seed = 7

    accumulated = copy.deepcopy(small_model)
    opt = torch.optim.SGD(accumulated.parameters(), lr=0.5)
    out = train_step(accumulated, process, [xa, xb], opt, StepOptions(grad_clip=grad_clip),
                     torch.Generator().manual_seed(seed))

    # The same draws, in train_step's order: t then noise for each micro-batch.
    g = torch.Generator().manual_seed(seed)
    ta, na = process.sample_t(3, "cpu", g), torch.randn(xa.shape, generator=g)
    tb, nb = process.sample_t(3, "cpu", g), torch.randn(xb.shape, generator=g)
    whole = copy.deepcopy(small_model)
    whole.train()
    loss = process.training_loss(whole, torch.cat([xa, xb]), torch.cat([ta, tb]), torch.cat([na, nb])).mean()
    loss.backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in whole.parameters()])
    if grad_clip > 0:
        assert norm > grad_clip  # the clip is active
        torch.nn.utils.clip_grad_norm_(whole.parameters(), grad_clip)
    torch.optim.SGD(whole.parameters(), lr=0.5).step()

    assert out["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert out["grad_norm"].item() == pytest.approx(norm.item(), rel=1e-4)
    moved = 0.0
    for (name, p), q, p0 in zip(accumulated.named_parameters(), whole.parameters(), small_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        moved = max(moved, (p - p0).abs().max().item())
    assert moved > 1e-3  # the step did something
    assert all(p.grad is None for p in accumulated.parameters())  # gradients cleared for the next step


def test_train_step_is_reproducible_and_returns_detached_tensors(small_model):
    process = DiffusionProcess(linear_betas(1000))
    x = images(4)
    outs = []
    for _ in range(2):
        m = copy.deepcopy(small_model)
        opt = make_optimizer(m, lr=1e-3, weight_decay=0.0)
        out = train_step(m, process, [x[:2], x[2:]], opt, StepOptions(min_snr_gamma=5.0),
                         torch.Generator().manual_seed(3))
        assert set(out) == {"loss", "grad_norm"}
        assert not out["loss"].requires_grad and math.isfinite(out["loss"].item())
        outs.append((out["loss"].item(), [p.detach().clone() for p in m.parameters()]))
    assert outs[0][0] == outs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


def test_train_step_under_bf16_autocast_runs(small_model):
    process = DiffusionProcess(linear_betas(1000))
    opt = make_optimizer(small_model, lr=1e-3, weight_decay=0.0)
    out = train_step(small_model, process, [images(2)], opt, StepOptions(bf16=True),
                     torch.Generator().manual_seed(0))
    assert out["loss"].dtype == torch.float32 and math.isfinite(out["loss"].item())


def test_lr_warmup():
    assert lr_at(0, 1e-3, 10) == pytest.approx(1e-4)
    assert lr_at(4, 1e-3, 10) == pytest.approx(5e-4)
    assert lr_at(9, 1e-3, 10) == 1e-3
    assert lr_at(10_000, 1e-3, 10) == 1e-3
    assert lr_at(0, 1e-3, 0) == 1e-3


# ----------------------------------------------------------------- EMA


def test_ema_update_is_the_lerp_formula(small_model):
    ema = EMA(small_model, decay=0.9)
    shadow0 = [s.clone() for s in ema.shadow]
    with torch.no_grad():
        for p in small_model.parameters():
            p.add_(0.37)
    ema.update(small_model)
    for s, s0, p in zip(ema.shadow, shadow0, small_model.parameters()):
        assert torch.equal(s, torch.lerp(s0, p.detach(), 0.1))
        torch.testing.assert_close(s, 0.9 * s0 + 0.1 * p.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(s, s0 + 0.1 * 0.37, rtol=0, atol=1e-6)


def test_ema_of_a_constant_model_converges_geometrically():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(3):
        ema.update(model)
    assert ema.shadow[0].tolist() == [[1 - 0.5**3, 1 - 0.5**3]]  # exact in binary


def test_ema_copy_to_and_state_dict(small_model):
    ema = EMA(small_model, decay=0.99)
    other = copy.deepcopy(small_model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(2)
    ema.update(other)
    target = copy.deepcopy(small_model)
    ema.copy_to(target)
    assert all(torch.equal(p, s) for p, s in zip(target.parameters(), ema.shadow))
    restored = EMA(small_model, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.99
    assert all(torch.equal(a, b) for a, b in zip(restored.shadow, ema.shadow))
    with pytest.raises(ValueError, match="does not match"):
        EMA(torch.nn.Linear(2, 2), 0.9).load_state_dict(ema.state_dict())


# ----------------------------------------------------------------- divergence


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_raises_naming_the_step(loss):
    with pytest.raises(TrainingDivergedError, match="at step 1234") as info:
        check_finite(loss, 1234)
    assert isinstance(info.value, AkodError)


def test_check_finite_accepts_finite_losses():
    for loss in (0.0, 1e-30, 123.4, 1e300):
        check_finite(loss, 5)


# ----------------------------------------------------------------- validation losses


def test_reference_protocol_is_fixed_and_exact_for_known_models():
    ref_process = DiffusionProcess(uniform_logsnr_betas(1000, LMAX, LMIN))
    x0 = images(4)
    ref = ReferenceProtocol(ref_process, x0, grid=8)
    assert ref.t_grid.tolist() == [0, 143, 285, 428, 571, 714, 856, 999]
    # The zero model's loss is the mean squared fixed noise.
    assert ref.loss(ZeroModel()) == pytest.approx((ref.noise.double() ** 2).mean().item(), rel=1e-6)
    assert ref.loss(ZeroModel()) == ReferenceProtocol(ref_process, x0, grid=8).loss(ZeroModel())

    class Oracle(torch.nn.Module):
        def forward(self, x, cond):
            t = (cond[:, :1] - ref_process.noise_cond(torch.arange(1000))[None, :, 0]).abs().argmin(dim=1)
            return ref_process.predict_eps_from_x0(x, t, x0)

    assert ref.loss(Oracle()) < 1e-8


@pytest.mark.parametrize("batch", [1, 3, 4, 64])
def test_reference_protocol_value_does_not_depend_on_its_forward_batch(batch):
    """train.val_batch only splits the forward passes (memory): the same images, noise and grid."""
    ref_process = DiffusionProcess(uniform_logsnr_betas(1000, LMAX, LMIN))
    x0 = images(7)
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, 3, padding=1)

    class Conv(torch.nn.Module):
        def forward(self, x, cond):
            return model(x) * cond[:, :1, None, None].sigmoid()

    whole = ReferenceProtocol(ref_process, x0, grid=5).loss(Conv())
    split = ReferenceProtocol(ref_process, x0, grid=5, batch=batch).loss(Conv())
    assert split == pytest.approx(whole, rel=1e-6)
    assert whole > 0.1


def test_reference_protocol_sets_eval_mode(small_model):
    ref = ReferenceProtocol(DiffusionProcess(uniform_logsnr_betas(100, LMAX, LMIN)), images(2), grid=3)
    small_model.train()
    ref.loss(small_model)
    assert not small_model.training


def test_schedule_loss_is_seeded():
    process = DiffusionProcess(linear_betas(1000))
    x0 = images(3)
    a = schedule_loss(ZeroModel(), process, x0, seed=1)
    assert a == schedule_loss(ZeroModel(), process, x0, seed=1)
    assert a != schedule_loss(ZeroModel(), process, x0, seed=2)
    assert a == pytest.approx(1.0, abs=0.15)


# ----------------------------------------------------------------- a short real training run


def linear_shrinkage_loss(process: DiffusionProcess, x0: torch.Tensor, t_grid: torch.Tensor) -> float:
    """The reference loss of the best per-channel linear denoiser eps_hat = s (x_t - a mu) / (a^2 v + s^2):
    a^2 v / (a^2 v + s^2) per channel, averaged over the grid. A network must beat it to show it
    learned image structure, not only the noise level."""
    mu, v = x0.mean(dim=(0, 2, 3)).double(), x0.var(dim=(0, 2, 3)).double()
    total = 0.0
    for t in t_grid.tolist():
        a2, s2 = process.abar[t].item(), 1 - process.abar[t].item()
        total += (a2 * v / (a2 * v + s2)).mean().item()
    return total / len(t_grid)


@pytest.mark.slow
def test_training_on_cifar10_lowers_the_reference_loss(cifar_dir):
    """100 steps of a tiny U-Net on 512 CIFAR-10 images (about 45 s on two busy CPU cores).

    Measured: 1.0003 -> 0.273 / 0.258 / 0.271 (seeds 0, 1, 2; 0.32-0.33 after 50 steps), where
    the best per-channel linear denoiser scores 0.41; asserted with headroom: below half the
    initial loss and below 0.8 x the linear denoiser (0.33).
    """
    t_start = time.time()
    train_x = to_model_range(load_images(cifar_dir, "train", count=512, seed=0))
    val_x = to_model_range(load_images(cifar_dir, "test", count=64, seed=0))
    cfg = ModelConfig(channels=(16, 16, 32, 32), bottleneck_channels=32, num_res_blocks=1,
                      attention_resolutions=(), dropout=0.0, msfi=False, beta_modulation=False)
    torch.manual_seed(0)
    model = UNet(cfg)
    process = DiffusionProcess(linear_betas(1000))
    ref = ReferenceProtocol(DiffusionProcess(uniform_logsnr_betas(1000, LMAX, LMIN)), val_x, grid=8)
    baseline = linear_shrinkage_loss(ref.process, val_x, ref.t_grid)
    assert 0.35 < baseline < 0.5

    lr, warmup, steps, batch = 2e-3, 10, 100, 16
    opt = make_optimizer(model, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    initial = ref.loss(model)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, warmup)
        idx = torch.randint(0, train_x.shape[0], (batch,), generator=g)
        out = train_step(model, process, [train_x[idx]], opt, StepOptions(grad_clip=1.0), g)
        losses.append(out["loss"].item())
        check_finite(losses[-1], step)
    final = ref.loss(model)
    print(f"reference loss {initial:.4f} -> {final:.4f} (linear denoiser {baseline:.4f}); "
          f"train loss {sum(losses[:10]) / 10:.4f} -> {sum(losses[-10:]) / 10:.4f}; {time.time() - t_start:.1f} s")
    assert initial == pytest.approx(1.0, abs=0.05)  # zero-initialized output: eps_hat = 0
    assert final < 0.5 * initial
    assert final < 0.8 * baseline
    assert sum(losses[-10:]) < sum(losses[:10])
