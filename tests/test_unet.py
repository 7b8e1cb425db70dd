"""The AKOD U-Net: shapes, parameter count at the paper's widths, which conditioning it reads, gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from akod_ray.config import ModelConfig
from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.diffusion.schedules import cosine_betas, laplace_betas, linear_betas, uniform_logsnr_betas
from akod_ray.models.layers import LogSNREmbedding, group_norm
from akod_ray.models.msfi import MSFI
from akod_ray.models.unet import UNet, count_parameters, level_cond
from akod_ray.training.step import StepOptions, make_optimizer, train_step

# ModelConfig() defaults: channels (128, 256, 256, 512), bottleneck 512, 2 res blocks, attention
# at 16x16, MSFI and beta modulation on. A change of architecture must change this on purpose.
PAPER_PARAMS = 67_151_043

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def inputs(batch: int = 2, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    p = DiffusionProcess(linear_betas(1000))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, p.noise_cond(t)


def test_paper_width_unet_shape_and_parameter_count():
    torch.manual_seed(0)
    model = UNet(ModelConfig()).eval()
    n = count_parameters(model)
    print(f"AKOD U-Net at the paper's widths: {n:,} parameters")
    assert n == PAPER_PARAMS
    x, cond = inputs(2)
    with torch.no_grad():
        out = model(x, cond)
    assert out.shape == x.shape and out.dtype == x.dtype
    # The plain DDPM U-Net (no MSFI, no modulation) is the same network minus those two parts.
    plain = UNet(dataclasses.replace(ModelConfig(), msfi=False, beta_modulation=False))
    c = 512
    msfi_params = 3 * c * c + (c * 2 * c + 2 * c) + (2 * c * c + c)
    mod_params = (2 * 64 + 64) + (64 * 2 * 128 + 2 * 128)
    assert count_parameters(plain) == PAPER_PARAMS - msfi_params - mod_params


@pytest.mark.parametrize("msfi", [False, True])
@pytest.mark.parametrize("beta_modulation", [False, True])
def test_tiny_unet_runs_in_every_arm(tiny_model_config, msfi, beta_modulation):
    cfg = dataclasses.replace(tiny_model_config, msfi=msfi, beta_modulation=beta_modulation)
    model = UNet(cfg)
    assert (model.msfi is not None) == msfi and (model.modulation is not None) == beta_modulation
    x, cond = inputs(3)
    out = model(x, cond)
    assert out.shape == (3, 3, 32, 32)
    # Zero-initialized output layer: the untrained network predicts eps = 0 (loss 1 on unit noise).
    assert torch.equal(out, torch.zeros_like(out))


def test_other_image_sizes(tiny_model_config):
    model = UNet(tiny_model_config, image_size=16)
    x, cond = inputs(1, size=16)
    assert model(x, cond).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="multiple of 16"):
        UNet(tiny_model_config, image_size=24)


def output_changes(model, column: int, delta: float = 0.7) -> bool:
    x, cond = inputs(2)
    cond2 = cond.clone()
    cond2[:, column] += delta
    if column == 3:
        cond2[:, 3] = cond[:, 3] * 0.5  # beta stays in (0, 1)
    with torch.no_grad():
        return not torch.equal(model(x, cond), model(x, cond2))


def test_plain_unet_reads_only_log_snr_t(tiny_model_config, perturb_zero_init):
    cfg = dataclasses.replace(tiny_model_config, msfi=False, beta_modulation=False)
    model = perturb_zero_init(UNet(cfg)).eval()
    assert output_changes(model, 0)
    for col in (1, 2, 3):
        assert not output_changes(model, col), f"plain U-Net output depends on cond column {col}"


def test_msfi_reads_the_neighbouring_noise_levels(tiny_model_config, perturb_zero_init):
    cfg = dataclasses.replace(tiny_model_config, msfi=True, beta_modulation=False, noise_cond="schedule")
    model = perturb_zero_init(UNet(cfg)).eval()
    assert output_changes(model, 1) and output_changes(model, 2)
    assert not output_changes(model, 3)


def test_msfi_is_the_identity_at_init(tiny_model_config, perturb_zero_init):
    """Everything perturbed except the MSFI's zero output layer: F(t-1), F(t+1) do not matter yet."""
    cfg = dataclasses.replace(tiny_model_config, msfi=True, beta_modulation=False, noise_cond="schedule")
    model = UNet(cfg).eval()
    saved = [p.detach().clone() for p in model.msfi.ffn_out.parameters()]
    perturb_zero_init(model)
    with torch.no_grad():
        for p, s in zip(model.msfi.ffn_out.parameters(), saved):
            p.copy_(s)
    assert not model.msfi.ffn_out.weight.any()
    assert output_changes(model, 0)
    assert not output_changes(model, 1) and not output_changes(model, 2)


def test_beta_modulation_reads_beta(tiny_model_config, perturb_zero_init):
    cfg = dataclasses.replace(tiny_model_config, msfi=False, beta_modulation=True, noise_cond="schedule")
    model = perturb_zero_init(UNet(cfg)).eval()
    assert output_changes(model, 3)
    assert not output_changes(model, 1) and not output_changes(model, 2)


@pytest.mark.parametrize("msfi,beta_modulation", [(True, True), (True, False), (False, True)])
def test_level_conditioned_akod_unet_reads_only_the_noise_level(tiny_model_config, perturb_zero_init, msfi,
                                                                 beta_modulation):
    cfg = dataclasses.replace(tiny_model_config, msfi=msfi, beta_modulation=beta_modulation, noise_cond="level")
    model = perturb_zero_init(UNet(cfg)).eval()
    assert output_changes(model, 0)
    for col in (1, 2, 3):
        assert not output_changes(model, col), f"level-conditioned U-Net output depends on cond column {col}"


def test_akod_unet_gives_the_same_output_for_a_noise_level_on_any_grid(tiny_model_config, perturb_zero_init):
    """Issue 21, item 6: the same noise level through two schedules' conditioning (laplace, the training
    schedule of the experiment, and cosine, another grid): the level-conditioned AKOD U-Net gives the same
    output to the bit; the schedule-conditioned one (versions 1-2) does not."""
    lam = torch.tensor([4.0, 1.3, 0.0, -0.7, -5.0], dtype=torch.float64)
    a = DiffusionProcess(laplace_betas(1000, 9.21, -10.13, 0.75)).cond_at_logsnr(lam)
    b = DiffusionProcess(cosine_betas(1000)).cond_at_logsnr(lam)
    assert torch.equal(a[:, 0], b[:, 0]) and not torch.allclose(a[:, 1:], b[:, 1:])
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    level = perturb_zero_init(UNet(dataclasses.replace(tiny_model_config, noise_cond="level"))).eval()
    old = perturb_zero_init(UNet(dataclasses.replace(tiny_model_config, noise_cond="schedule"))).eval()
    with torch.no_grad():
        assert torch.equal(level(x, a), level(x, b))
        assert not torch.allclose(old(x, a), old(x, b))


def test_level_cond_is_a_step_of_a_grid_uniform_in_log_snr():
    """Closed form: on a grid uniform in log-SNR whose steps are level_offset apart, a step's neighbours
    and beta_t are exactly what level_cond computes from its noise level."""
    T, hi, lo = 1000, 9.21, -10.13
    p = DiffusionProcess(uniform_logsnr_betas(T, hi, lo))
    t = torch.arange(1, T - 1)
    offset = (hi - lo) / (T - 1)
    got = level_cond(p.log_snr[t], offset).double()
    want = torch.stack([p.log_snr[t], p.log_snr[t - 1], p.log_snr[t + 1], p.betas[t]], dim=1)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


# Widths of 64: GroupNorm(32) then has 2 channels a group. At widths <= 32 every group is one
# channel, and a conv bias right before the norm is removed by it (its gradient is rounding noise).
WIDE = ModelConfig(channels=(64, 64, 64, 64), bottleneck_channels=64, num_res_blocks=1,
                   attention_resolutions=(8,), dropout=0.0, msfi=True, beta_modulation=True)


def parameters_without_gradient(model, rel: float = 1e-5) -> list[str]:
    """Parameters whose gradient is zero or rounding noise (max |grad| <= rel max |param|)."""
    return [n for n, p in model.named_parameters()
            if p.grad is None or p.grad.abs().max() <= rel * max(p.abs().max().item(), 1e-3)]


def test_gradient_reaches_every_parameter(perturb_zero_init):
    model = perturb_zero_init(UNet(WIDE, image_size=16))
    x, cond = inputs(2, size=16)
    model(x, cond).square().mean().backward()
    missing = parameters_without_gradient(model)
    assert not missing, f"no gradient reaches {missing}"


def test_gradient_reaches_every_parameter_after_a_few_steps_from_the_true_init():
    """The zero-initialized layers (output, residual branches, MSFI) open up within three steps.

    Behind a zero layer the gradient is exactly 0; after three AdamW steps those layers are
    ~1e-3 and the gradients behind them are small but not zero (at width 64 no gradient is
    mere rounding noise, see WIDE).
    """
    torch.manual_seed(0)
    model = UNet(WIDE, image_size=16)
    process = DiffusionProcess(linear_betas(1000))
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    t = torch.tensor([10, 900])
    loss = lambda: process.training_loss(model, x0[:2], t, torch.randn(2, 3, 16, 16, generator=g)).mean()  # noqa: E731
    loss().backward()
    at_init = parameters_without_gradient(model, rel=0.0)
    assert "conv_out.weight" not in at_init and "conv_out.bias" not in at_init
    assert "mid.res1.conv1.weight" in at_init and "msfi.W2.weight" in at_init  # behind zero layers at init
    model.zero_grad()
    for _ in range(3):
        train_step(model, process, [x0], opt, StepOptions(grad_clip=0.0), g)
    loss().backward()
    missing = parameters_without_gradient(model, rel=0.0)
    assert not missing, f"no gradient reaches {missing} after three steps"


# ----------------------------------------------------------------- layers


def test_msfi_formula(perturb_zero_init):
    torch.manual_seed(0)
    m = perturb_zero_init(MSFI(8, ffn_mult=2))
    g = torch.Generator().manual_seed(1)
    Ft, Fp, Fn = (torch.randn(2, 8, 2, 2, generator=g) for _ in range(3))
    conv = lambda layer, x: torch.nn.functional.conv2d(x, layer.weight, layer.bias)  # noqa: E731
    mixed = conv(m.W1, Ft) + conv(m.W2, Fp) + conv(m.W3, Fn)
    expected = Ft + conv(m.ffn_out, torch.nn.functional.silu(conv(m.ffn_in, mixed)))
    torch.testing.assert_close(m(Ft, Fp, Fn), expected)


def test_log_snr_embedding_separates_nearby_noise_levels():
    torch.manual_seed(0)
    emb = LogSNREmbedding(32, 64)
    out = emb(torch.tensor([0.0, 0.01, -10.0]))
    assert out.shape == (3, 64)
    assert not torch.equal(out[0], out[1])


def test_group_norm_uses_32_groups_where_the_width_allows():
    assert {c: group_norm(c).num_groups for c in (8, 16, 24, 48, 64, 128, 512)} == {
        8: 8, 16: 16, 24: 8, 48: 16, 64: 32, 128: 32, 512: 32}


def test_a_checkpoint_from_before_level_conditioning_keeps_its_schedule_conditioning(tmp_path):
    """A checkpoint whose stored config predates model.noise_cond was trained on the schedule's columns and
    loads so; a new config gets the level conditioning."""
    from checkpoint_helpers import checkpoint_state, make_checkpoint, tiny_config

    from akod_ray.training.checkpoint import load_for_sampling

    cfg = tiny_config(tmp_path, "old")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, msfi=True, beta_modulation=True))
    state = checkpoint_state(cfg)
    del state["config"]["model"]["noise_cond"]
    folder = make_checkpoint(tmp_path / "old", state, cfg=cfg)
    assert load_for_sampling(folder)[2].model.noise_cond == "schedule"
    assert load_for_sampling(make_checkpoint(tmp_path / "new", checkpoint_state(cfg), cfg=cfg))[2].model.noise_cond \
        == "level"
