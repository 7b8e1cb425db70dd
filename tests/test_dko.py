"""DKO building blocks: sigma_local against closed forms, and the knot schedule builder's guarantees."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from akod_ray.diffusion.dko import (
    DKO,
    OBS_DIM,
    KnotScheduleBuilder,
    betas_from_logsnr,
    DKOContext,
    DKOObserver,
    learned_schedule,
    gaussian_kernel,
    knot_positions,
    local_variance,
    local_variance_map,
    logsnr_at_steps,
    logsnr_knots,
    schedule_from_actions,
    schedule_from_knots,
    uniform_logsnr_betas,
)
from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.diffusion.schedules import validate_betas

LMAX, LMIN, SHARE = 9.21, -10.13, 0.1
KERNELS = (3, 5, 7, 9, 11)


def gaussian_1d(k: int) -> list[float]:
    """OpenCV's rule, by hand: sigma = 0.3 ((k - 1) / 2 - 1) + 0.8, normalized."""
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    g = [math.exp(-((i - (k - 1) / 2) ** 2) / (2 * sigma**2)) for i in range(k)]
    return [v / sum(g) for v in g]


# ----------------------------------------------------------------- Gaussian kernel


@pytest.mark.parametrize("k", KERNELS)
def test_gaussian_kernel_is_normalized_symmetric_and_separable(k):
    G = gaussian_kernel(k)
    assert G.shape == (k, k) and G.dtype == torch.float64
    assert G.sum().item() == pytest.approx(1.0, abs=1e-15)
    assert (G > 0).all()
    assert torch.equal(G, G.T) and torch.equal(G, G.flip(0)) and torch.equal(G, G.flip(1))
    assert G[k // 2, k // 2] == G.max()
    g = torch.tensor(gaussian_1d(k), dtype=torch.float64)
    torch.testing.assert_close(G, torch.outer(g, g), rtol=1e-13, atol=1e-16)


def test_gaussian_kernel_literal():
    # k = 3: sigma = 0.8, 1-D weights (e^-0.78125, 1, e^-0.78125) / sum.
    e = math.exp(-1 / (2 * 0.64))
    assert gaussian_kernel(3)[1, 1].item() == pytest.approx((1 / (1 + 2 * e)) ** 2, rel=1e-14)
    assert gaussian_kernel(3)[1, 1].item() == pytest.approx(0.27249597351072813, rel=1e-12)


@pytest.mark.parametrize("k", [-1, 0, 1, 2, 4, 6, 10])
def test_even_or_small_kernel_is_rejected(k):
    with pytest.raises(ValueError, match=r"dko\.kernel_size must be odd and >= 3"):
        gaussian_kernel(k)
    with pytest.raises(ValueError, match=r"dko\.kernel_size"):
        local_variance(torch.zeros(1, 3, 16, 16), k)


# ----------------------------------------------------------------- local variance


@pytest.mark.parametrize("k", KERNELS)
def test_local_variance_of_a_constant_image_is_zero(k):
    x = torch.full((2, 3, 16, 16), 0.37, dtype=torch.float64)
    assert local_variance(x, k).abs().max().item() < 1e-15
    assert local_variance(x.float() - 1.2, k).abs().max().item() < 1e-6


@pytest.mark.parametrize("k", KERNELS)
def test_local_variance_of_unit_white_noise_is_one_minus_sum_of_squared_weights(k):
    """E[var_k] = E[G*(x^2)] - E[(G*x)^2] = 1 - sum(G_k^2) for i.i.d. N(0, 1) pixels."""
    expected = 1 - sum(w * w for w in gaussian_1d(k)) ** 2
    x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(k))
    got = local_variance(x, k).item()
    # The sample mean of x^2 over ~7.5e5 pixels has relative std sqrt(2 / 7.5e5) = 0.0016; 5 of them.
    assert got == pytest.approx(expected, rel=0.008)
    assert abs(got - 1.0) > 0.012  # distinguishable from the plain variance even at k = 11


def test_local_variance_literal_closed_forms():
    assert 1 - float((gaussian_kernel(3) ** 2).sum()) == pytest.approx(0.8504379800088643, rel=1e-12)
    assert 1 - float((gaussian_kernel(7) ** 2).sum()) == pytest.approx(0.9576423872119, rel=1e-12)


def test_local_variance_map_matches_a_direct_computation():
    k = 5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    m = local_variance_map(x, k)
    assert m.shape == (2, 3, 9 - k + 1, 11 - k + 1)  # 'valid': no padding
    w = torch.tensor(gaussian_1d(k), dtype=torch.float64)
    W = torch.outer(w, w)
    for b, c, i, j in [(0, 0, 0, 0), (1, 2, 4, 6), (0, 1, 2, 3)]:
        patch = x[b, c, i:i + k, j:j + k]
        mean = (W * patch).sum()
        var = (W * (patch - mean) ** 2).sum()  # the weighted variance around the weighted mean
        assert m[b, c, i, j].item() == pytest.approx(var.item(), rel=1e-10)
    torch.testing.assert_close(local_variance(x, k), m.mean(dim=(1, 2, 3)))


def test_local_variance_is_shift_invariant_and_scales_quadratically():
    x = torch.randn(3, 3, 20, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = local_variance(x, 7)
    assert v.shape == (3,)
    torch.testing.assert_close(local_variance(2.5 * x - 0.3, 7), 6.25 * v, rtol=1e-10, atol=0)


# ----------------------------------------------------------------- knot schedule builder

# (T, num_knots) where the steepest possible segment still fits beta <= 0.999: the per-step
# log-SNR drop is at most K R / (T - 1) and beta_t <= 1 - exp(-drop), so K R / (T - 1) <= log(1000).
RESOLUTIONS = [(T, K) for T in (50, 100, 1000) for K in (2, 3, 4, 8, 16, 32)
               if K * (LMAX - LMIN) / (T - 1) <= math.log(1000)]

finite = st.floats(allow_nan=False, allow_infinity=False)
scaled_normal = st.tuples(st.integers(0, 2**32 - 1), st.sampled_from([1.0, 10.0, 1e3, 1e6]))


def check_schedule(betas: torch.Tensor, T: int, lmax: float = LMAX, lmin: float = LMIN) -> None:
    validate_betas(betas, T)
    ls = DiffusionProcess(betas).log_snr
    assert abs(ls[0].item() - lmax) < 1e-9
    assert abs(ls[-1].item() - lmin) < 1e-9
    assert (ls[1:] < ls[:-1]).all()


def test_resolutions_cover_the_defaults():
    assert (1000, 16) in RESOLUTIONS and (100, 32) in RESOLUTIONS and len(RESOLUTIONS) >= 14


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(res=st.sampled_from(RESOLUTIONS), share=st.sampled_from([0.01, 0.1, 0.5]), data=st.data())
def test_any_finite_actions_give_a_valid_schedule(res, share, data):
    T, K = res
    actions = data.draw(st.lists(finite, min_size=K - 1, max_size=K - 1))
    check_schedule(schedule_from_actions(actions, T, K, LMAX, LMIN, share), T)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(res=st.sampled_from(RESOLUTIONS), normal=scaled_normal)
def test_random_normal_actions_at_any_scale_give_a_valid_schedule(res, normal):
    T, K = res
    seed, scale = normal
    actions = torch.randn(K - 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    check_schedule(schedule_from_actions(actions, T, K, LMAX, LMIN, SHARE), T)


@pytest.mark.parametrize("T, K", [(100, 16), (1000, 16), (1000, 32), (100, 2), (50, 8)])
@pytest.mark.parametrize("pattern", ["plus", "minus", "alternating", "minus_alternating", "zero", "tiny"])
def test_extreme_actions_give_a_valid_schedule(T, K, pattern):
    n = K - 1
    actions = {
        "plus": [1e300] * n,
        "minus": [-1e300] * n,
        "alternating": [1e300 * (-1) ** i for i in range(n)],
        "minus_alternating": [-1e300 * (-1) ** i for i in range(n)],
        "zero": [0.0] * n,
        "tiny": [5e-324] * n,
    }[pattern]
    check_schedule(schedule_from_actions(actions, T, K, LMAX, LMIN, SHARE), T)


def test_zero_actions_give_the_uniform_log_snr_schedule():
    """a = 0 takes the uniform share: the DKO's initial output reproduces the reference schedule."""
    knots = logsnr_knots([0.0] * 15, 16, LMAX, LMIN, SHARE)
    torch.testing.assert_close(knots, torch.linspace(LMAX, LMIN, 17, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(schedule_from_actions([0.0] * 15, 1000, 16, LMAX, LMIN, SHARE),
                               uniform_logsnr_betas(1000, LMAX, LMIN), rtol=1e-9, atol=0)


def test_knots_by_hand():
    """K = 3, R = 19.34, min_share 0.1: base drop 0.6447 per segment, free range 17.406."""
    R = LMAX - LMIN
    base, free = SHARE * R / 3, (1 - SHARE) * R
    a0, a1 = 1.0, -0.5
    f0 = 1 / (1 + math.exp(-(a0 - math.log(2))))  # 3 segments left: uniform share 1/3 = sigmoid(-log 2)
    f1 = 1 / (1 + math.exp(-(a1 - math.log(1))))  # 2 left: uniform share 1/2 = sigmoid(0)
    k1 = LMAX - base - f0 * free
    k2 = k1 - base - f1 * (1 - f0) * free
    knots = logsnr_knots([a0, a1], 3, LMAX, LMIN, SHARE)
    assert knots.tolist() == pytest.approx([LMAX, k1, k2, LMIN], rel=1e-14, abs=1e-14)


def test_endpoints_are_fixed_exactly():
    for actions in ([3.0, -1.0, 0.5], [1e300, 1e300, 1e300], [-7.0, 0.0, 7.0]):
        knots = logsnr_knots(actions, 4, LMAX, LMIN, SHARE)
        assert knots[0].item() == LMAX and knots[-1].item() == LMIN
        ls = logsnr_at_steps(knots, 200)
        assert ls[0].item() == LMAX and ls[-1].item() == pytest.approx(LMIN, abs=1e-12)


def test_every_segment_drops_by_at_least_the_base_share():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        actions = torch.randn(15, generator=g, dtype=torch.float64) * 30
        drops = -torch.diff(logsnr_knots(actions, 16, LMAX, LMIN, SHARE))
        assert drops.min().item() >= SHARE * (LMAX - LMIN) / 16 * (1 - 1e-12)
        assert drops.sum().item() == pytest.approx(LMAX - LMIN, abs=1e-12)


@pytest.mark.parametrize("j", [0, 3, 7, 13])
def test_builder_is_causal(j):
    """Changing action j changes knot j+1 and later, never knots 0..j, nor the betas up to knot j."""
    T, K = 1000, 16
    actions = torch.randn(K - 1, generator=torch.Generator().manual_seed(j), dtype=torch.float64)
    changed = actions.clone()
    changed[j] += 1.5
    ka, kb = logsnr_knots(actions, K, LMAX, LMIN, SHARE), logsnr_knots(changed, K, LMAX, LMIN, SHARE)
    assert torch.equal(ka[: j + 1], kb[: j + 1])
    assert ka[j + 1] != kb[j + 1]
    ba, bb = schedule_from_knots(ka, T), schedule_from_knots(kb, T)
    upto = int(knot_positions(T, K)[j].floor())
    assert torch.equal(ba[: upto + 1], bb[: upto + 1])
    assert not torch.equal(ba, bb)


def test_incremental_builder_matches_the_batch_function():
    b = KnotScheduleBuilder(5, LMAX, LMIN, SHARE)
    assert b.num_actions == 4 and not b.done and b.knots == [LMAX]
    actions = [0.3, -2.0, 4.0, 0.0]
    outs = [b.step(a) for a in actions]
    assert b.done
    assert outs[:-1] == b.knots[1:4] and outs[-1] == LMIN
    assert torch.equal(b.knot_logsnr(), logsnr_knots(actions, 5, LMAX, LMIN, SHARE))
    with pytest.raises(RuntimeError, match="already complete"):
        b.step(0.0)
    b.reset()
    assert b.knots == [LMAX] and b.free_left == pytest.approx((1 - SHARE) * (LMAX - LMIN))
    b.step(1.0)
    with pytest.raises(RuntimeError, match="incomplete: 1 of 5"):
        b.knot_logsnr()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_action_is_rejected(bad):
    with pytest.raises(ValueError, match="finite"):
        logsnr_knots([0.0, bad, 0.0], 4, LMAX, LMIN, SHARE)
    with pytest.raises(ValueError, match="finite"):
        KnotScheduleBuilder(4, LMAX, LMIN, SHARE).step(bad)


@pytest.mark.parametrize("n", [0, 14, 16])
def test_wrong_action_count_is_rejected(n):
    with pytest.raises(ValueError, match=f"need 15 DKO actions for 16 knots, got {n}"):
        schedule_from_actions([0.0] * n, 1000, 16, LMAX, LMIN, SHARE)


def test_bad_endpoints_are_rejected():
    with pytest.raises(ValueError, match="dko.logsnr_max"):
        KnotScheduleBuilder(4, -1.0, 1.0, SHARE)


def test_too_coarse_T_for_the_knots_is_refused_not_clamped():
    """T = 20 with 16 knots cannot hold a whole free range in one step: a clear error, no silent clip."""
    with pytest.raises(ValueError, match="DKO schedule: beta_t must lie in"):
        schedule_from_actions([-1e300] * 15, 20, 16, LMAX, LMIN, SHARE)


# ----------------------------------------------------------------- log-SNR -> betas


def test_betas_from_logsnr_inverts_the_process_log_snr():
    ls = logsnr_at_steps(logsnr_knots([0.5, -1.0, 2.0, 0.0, -3.0, 1.0, 0.0], 8, LMAX, LMIN, SHARE), 1000)
    p = DiffusionProcess(betas_from_logsnr(ls))
    torch.testing.assert_close(p.log_snr, ls, rtol=0, atol=1e-8)


def test_logsnr_at_steps_interpolates_linearly_between_knots():
    knots = torch.tensor([4.0, 1.0, -2.0, -8.0], dtype=torch.float64)
    ls = logsnr_at_steps(knots, 7)  # knots at steps 0, 2, 4, 6
    assert ls.tolist() == pytest.approx([4.0, 2.5, 1.0, -0.5, -2.0, -5.0, -8.0], abs=1e-15)


def test_uniform_logsnr_betas_are_linear_in_log_snr():
    p = DiffusionProcess(uniform_logsnr_betas(1000, LMAX, LMIN))
    torch.testing.assert_close(p.log_snr, torch.linspace(LMAX, LMIN, 1000, dtype=torch.float64), rtol=0, atol=1e-9)


# ----------------------------------------------------------------- the DKO MLP


def test_dko_mlp_starts_at_action_zero_with_log_std_minus_half():
    torch.manual_seed(0)
    net = DKO(hidden=(16, 16))
    obs = torch.randn(7, OBS_DIM)
    out = net(obs)
    assert out.shape == (7, 2)
    assert torch.equal(out[:, 0], torch.zeros(7)) and torch.equal(out[:, 1], torch.full((7,), -0.5))
    out.sum().backward()
    assert net.head.weight.grad.abs().sum() > 0


def _observer(pool_seed: int = 0, n: int = 48, probe: int = 8) -> DKOObserver:
    g = torch.Generator().manual_seed(pool_seed)
    # images with very different local texture: half smooth ramps, half high-frequency noise
    smooth = torch.linspace(-1, 1, 16).repeat(n // 2, 3, 16, 1)
    rough = torch.rand((n // 2, 3, 16, 16), generator=g) * 2 - 1
    return DKOObserver(torch.cat([smooth, rough]), probe, 7, 1000, 8, 9.21, -10.13, 0.1)


def test_dko_observation_layout_and_closed_form_features():
    obs = _observer().observation(2, 1.5, DKOContext(progress=0.25, ref_loss=math.e, probe_seed=3))
    assert obs.shape == (OBS_DIM,) and obs.dtype == np.float32
    knot_t = float(knot_positions(1000, 8)[2]) + 1.0
    assert obs[0] == pytest.approx(knot_t / 1000, rel=1e-6)
    assert obs[2] == pytest.approx(0.15, rel=1e-6) and obs[3] == pytest.approx(0.25) and obs[4] == pytest.approx(1.0)
    assert obs[5] == 0.0  # no loss profile yet


def test_dko_observation_is_not_a_function_of_log_snr_alone():
    """Issue 11: at the same knot and log-SNR, different probe images (and training states) observe differently."""
    ob = _observer()
    lam = 2.0
    a, b = (ob.observation(3, lam, DKOContext(probe_seed=s)) for s in (0, 1))
    assert a[0] == b[0] and a[2] == b[2]  # the same knot, the same log-SNR
    assert abs(a[1] - b[1]) > 1e-3  # sigma_local of different probe images and noise differs
    # the probe is drawn afresh per seed, deterministically
    np.testing.assert_array_equal(ob.observation(3, lam, DKOContext(probe_seed=0)), a)
    x0_a, _ = ob.probe(0)
    x0_b, _ = ob.probe(1)
    assert not torch.equal(x0_a, x0_b)
    # two training states at the same knot: progress, loss level and loss profile all enter
    grid = [9.0, 3.0, -3.0, -9.0]
    early = DKOContext(progress=0.1, ref_loss=0.5, loss_profile=[0.1, 0.3, 0.8, 0.8], profile_logsnr=grid)
    late = DKOContext(progress=0.9, ref_loss=0.2, loss_profile=[0.02, 0.4, 0.2, 0.18], profile_logsnr=grid)
    e, l = ob.observation(3, lam, early), ob.observation(3, lam, late)
    assert e[1] == l[1]  # the same probe seed
    assert e[3] != l[3] and e[4] != l[4] and e[5] != l[5]


def test_loss_profile_feature_interpolates_in_log_snr():
    ctx = DKOContext(ref_loss=0.2, loss_profile=[0.1, 0.4], profile_logsnr=[4.0, -4.0])
    mid = math.log(math.exp((math.log(0.1) + math.log(0.4)) / 2) / 0.2)
    assert ctx.relative_loss_at(0.0) == pytest.approx(mid, rel=1e-12)
    assert ctx.relative_loss_at(10.0) == pytest.approx(math.log(0.1 / 0.2))  # clamped at the ends
    assert ctx.relative_loss_at(-10.0) == pytest.approx(math.log(0.4 / 0.2))


def test_context_updates_from_a_posted_result_and_round_trips_as_plain_data():
    ctx = DKOContext(probe_seed=5).updated({"step": 50, "ref_loss": 0.3, "loss_profile": [0.1, 0.5],
                                            "profile_logsnr": [1.0, -1.0]}, total_steps=200)
    assert (ctx.progress, ctx.ref_loss, ctx.loss_profile, ctx.probe_seed) == (0.25, 0.3, [0.1, 0.5], 5)
    assert DKOContext.from_dict(ctx.to_dict()) == ctx
    assert ctx.updated({"step": 400}, 200).progress == 1.0  # clipped


def test_learned_schedule_of_the_initial_dko_is_uniform_in_log_snr_and_rebuilds_exactly():
    ob = _observer()
    net = DKO(hidden=(8, 8))
    ctx = DKOContext(progress=0.3, probe_seed=2)
    initial = learned_schedule({"weights": net.state_dict(), "context": ctx.to_dict()}, ob, (8, 8))
    torch.testing.assert_close(initial, uniform_logsnr_betas(1000, 9.21, -10.13), rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        net.head.bias[0] = 0.7
        net.head.weight[0, 0] = 0.3
    state = {"weights": net.state_dict(), "context": ctx.to_dict()}
    betas, _, actions = ob.build(net.deterministic_action, ctx)
    assert torch.equal(learned_schedule(state, ob, (8, 8)), betas) and not torch.equal(betas, initial)
    assert len(actions) == 7 and all(a != 0.0 for a in actions)


def test_observer_rejects_a_kernel_larger_than_the_images():
    with pytest.raises(ValueError, match="kernel_size=7 exceeds"):
        DKOObserver(torch.zeros(4, 3, 5, 5), 2, 7, 1000, 8, 9.21, -10.13, 0.1)


# ----------------------------------------------------------------- reach: knot spacing and the prior (issue 16)


@pytest.mark.parametrize("anchor, scale, tol", [("edm", 1.0, 0.05), ("laplace", 0.75, 0.07), ("laplace", 1.0, 0.06),
                                                ("laplace", 2.0, 0.05), ("loglinear", 1.0, 1e-9)])
def test_the_knot_builder_reaches_the_anchor_schedules(anchor, scale, tol):
    """With 16 cosine-spaced knots (the default) the builder's schedule through an anchor's knots is
    within a mean |delta log-SNR| of ``tol`` of the anchor at every step (the Wasserstein-1 distance
    between the two training distributions of log-SNR under uniform t), and exactly on it at the knots."""
    from akod_ray.diffusion.dko import actions_for_knots, prior_actions
    from akod_ray.diffusion.schedules import anchor_logsnr

    T, K = 1000, 16
    actions = prior_actions(anchor, T, K, LMAX, LMIN, SHARE, scale, "cosine")
    knots = logsnr_knots(actions, K, LMAX, LMIN, SHARE)
    target = anchor_logsnr(anchor, T, LMAX, LMIN, scale)
    pos = knot_positions(T, K, "cosine")
    at_knots = torch.from_numpy(np.interp(pos.numpy(), np.arange(T), target.numpy()))
    torch.testing.assert_close(knots, at_knots, rtol=0, atol=1e-9)
    built = DiffusionProcess(schedule_from_knots(knots, T, "cosine")).log_snr
    assert (built - target).abs().mean().item() < tol
    # the inverse really is the builder's inverse, and the prior makes zero DKO output build the anchor
    torch.testing.assert_close(logsnr_knots([0.0] * (K - 1), K, LMAX, LMIN, SHARE, actions), knots, rtol=0, atol=0)
    assert actions_for_knots(knots, K, LMAX, LMIN, SHARE) == pytest.approx(actions, abs=1e-9)


def test_uniform_knots_reach_the_anchors_far_worse_than_cosine_knots():
    from akod_ray.diffusion.dko import prior_actions
    from akod_ray.diffusion.schedules import anchor_logsnr

    T, K = 1000, 16
    err = {}
    for spacing in ("uniform", "cosine"):
        knots = logsnr_knots(prior_actions("laplace", T, K, LMAX, LMIN, SHARE, 1.0, spacing), K, LMAX, LMIN, SHARE)
        built = DiffusionProcess(schedule_from_knots(knots, T, spacing)).log_snr
        err[spacing] = (built - anchor_logsnr("laplace", T, LMAX, LMIN, 1.0)).abs().mean().item()
    assert err["cosine"] < 0.06 and err["uniform"] > 0.3


def test_knots_out_of_the_builders_reach_are_refused_and_so_is_such_a_prior():
    from akod_ray.config import load_config
    from akod_ray.diffusion.dko import actions_for_knots
    from akod_ray.errors import ConfigError

    K = 4
    drop = SHARE * (LMAX - LMIN) / K  # the least a segment may drop
    with pytest.raises(ValueError, match="knot 2: the segment drops log-SNR by"):
        actions_for_knots([LMAX, 5.0, 5.0 - drop / 2, -5.0, LMIN], K, LMAX, LMIN, SHARE)
    with pytest.raises(ConfigError, match=r"^dko\.prior 'laplace' is out of the DKO's reach with dko\.num_knots=32"):
        load_config(None, ["diffusion.schedule=akod", "dko.prior=laplace", "dko.num_knots=32", "dko.min_segment_share=0.2",
                           "rl.segment_steps=100", "train.ckpt_every=1000"])


def test_cosine_knot_positions():
    pos = knot_positions(1000, 4, "cosine")
    expected = [999 * (1 - math.cos(math.pi * k / 4)) / 2 for k in range(5)]
    assert pos.tolist() == pytest.approx(expected, abs=1e-9) and pos[0] == 0 and pos[-1] == 999
    with pytest.raises(ValueError, match="dko.knot_spacing"):
        knot_positions(1000, 4, "log")
