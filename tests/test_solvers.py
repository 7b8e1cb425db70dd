"""diffusers' samplers and the adaptive sampler on the project's schedules: exact on an oracle denoiser
(which checks the timestep -> log-SNR mapping and the input scaling), the same x_T for every sampler,
the budget spent exactly, diffusers' DDIM takes the project's DDIM step, the schedule's
scheduler_config.json round-trips through diffusers, schedules diffusers cannot take are refused."""

from __future__ import annotations

import json
import socket
import warnings
from pathlib import Path

import pytest
import torch

from akod_ray.diffusion.adaptive import adaptive_sample, next_logsnr
from akod_ray.diffusion.process import DiffusionProcess
from akod_ray.diffusion.dispatch import SAMPLERS, network_evaluations, sample, sample_batch
from akod_ray.diffusion.samplers import Denoiser, ddim_sample, ddim_timesteps, sampler_steps_problem
from akod_ray.diffusion.schedules import (DIFFUSERS_CONFIG, cosine_betas, linear_betas, save_schedule,
                                          uniform_logsnr_betas)
from akod_ray.diffusion.solvers import SOLVERS, build_scheduler, run_scheduler, solver_evaluations, solver_timesteps

from test_samplers import NoiseModel, dko_betas, x0_images

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn.t accept a copy keyword:DeprecationWarning")

DIFFUSERS_SOLVERS = list(SOLVERS)
ALL_SOLVERS = [name for name in SAMPLERS if name not in ("ddpm", "ddim")]  # diffusers' and the adaptive one
SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas, "learned": dko_betas}
LMAX, LMIN = 9.21, -10.13  # dko.logsnr_max / logsnr_min: the common grid's endpoints


def common_grid(T: int) -> DiffusionProcess:
    return DiffusionProcess(uniform_logsnr_betas(T, LMAX, LMIN))


class LogSNROracle(torch.nn.Module):
    """The ideal denoiser for one known x_0 at *any* noise level: it reads log-SNR from cond[:, 0] and
    returns eps = (x_t - sqrt(sigmoid(lambda)) x_0) / sqrt(sigmoid(-lambda)); records every call."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0
        self.log_snr: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []

    def forward(self, x, cond):
        lam = cond[:, 0].double()
        self.log_snr.append(lam)
        self.inputs.append(x.clone())
        view = (-1,) + (1,) * (x.ndim - 1)
        a, s = torch.sigmoid(lam).sqrt().view(view), torch.sigmoid(-lam).sqrt().view(view)
        return ((x.double() - a * self.x0.double()) / s).float()


class CountingModel(NoiseModel):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, cond):
        self.calls += 1
        return super().forward(x, cond)


@pytest.fixture(scope="module", params=sorted(SCHEDULES))
def process(request):
    return DiffusionProcess(SCHEDULES[request.param](1000))


# ----------------------------------------------------------------- every sampler, every schedule


@pytest.mark.parametrize("name", ALL_SOLVERS)
def test_each_sampler_returns_finite_images_in_range(process, name):
    out = sample(NoiseModel(), process, 3, torch.Generator().manual_seed(0), sampler=name, steps=10, image_size=8)
    assert out.shape == (3, 3, 8, 8)
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1
    raw = sample_batch(name, NoiseModel(), process, (3, 3, 8, 8), torch.Generator().manual_seed(0), 10)
    assert torch.isfinite(raw).all() and raw.abs().max() <= 1 + 1e-5  # x0 clipped at every evaluation


@pytest.mark.parametrize("name", ALL_SOLVERS)
@pytest.mark.parametrize("steps", [3, 10])
def test_each_sampler_recovers_x0_from_an_oracle(process, name, steps):
    """With the exact denoiser every deterministic solver lands on x_0 from any x_T: a wrong log-SNR for a
    timestep or a wrong input scaling gives the network a noise level its input does not have."""
    x0 = x0_images()
    model = LogSNROracle(x0)
    out = sample_batch(name, model, process, tuple(x0.shape), torch.Generator().manual_seed(0), steps)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)
    assert len(model.log_snr) == network_evaluations(name, steps, process.T)
    assert model.log_snr[0][0].item() == pytest.approx(process.log_snr[-1].item(), abs=1e-5)  # from pure noise


@pytest.mark.parametrize("name", ALL_SOLVERS)
def test_each_sampler_on_another_grid_than_its_training_schedule(name):
    """Trained on cosine, sampled on the common grid: the oracle (any noise level) still gives x_0."""
    x0 = x0_images()
    train = DiffusionProcess(cosine_betas(1000))
    model = LogSNROracle(x0)
    out = sample_batch(name, model, train, tuple(x0.shape), torch.Generator().manual_seed(1), 8,
                        grid=common_grid(1000))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)
    assert model.log_snr[0][0].item() == pytest.approx(LMIN, abs=1e-5)
    assert max(lam.max().item() for lam in model.log_snr) <= LMAX + 1e-5


def test_every_sampler_starts_from_the_same_x_T():
    """x_T = torch.randn(shape, generator) first, as ddim_sample draws it: the network's first input is
    exactly that tensor for every sampler (Euler and Heun hold it scaled by sqrt(1 + sigma_max^2))."""
    process = DiffusionProcess(linear_betas(1000))
    shape = (2, 3, 8, 8)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    for name in ALL_SOLVERS:
        model = LogSNROracle(x0_images())
        sample_batch(name, model, process, shape, torch.Generator().manual_seed(5), 4)
        torch.testing.assert_close(model.inputs[0], x_T, rtol=1e-6, atol=1e-6, msg=name)
    model = LogSNROracle(x0_images())
    ddim_sample(model, process, shape, torch.Generator().manual_seed(5), steps=4)
    assert torch.equal(model.inputs[0], x_T)


@pytest.mark.parametrize("name", DIFFUSERS_SOLVERS)
@pytest.mark.parametrize("T, steps", [(1000, 1), (1000, 7), (1000, 20), (50, 49), (17, 7)])
def test_diffusers_samplers_visit_the_same_grid_steps_from_pure_noise(name, T, steps):
    sched = build_scheduler(name, common_grid(T), max(steps, 3) if name == "heun" else steps)
    visited = [int(t) for t in sched.timesteps]
    n = (max(steps, 3) + 1) // 2 if name == "heun" else steps
    expected = solver_timesteps(T, n)
    assert expected[0] == T - 1 and len(set(expected)) == n
    assert list(dict.fromkeys(visited)) == expected  # Heun visits each step twice but the first
    assert len(visited) == solver_evaluations(name, max(steps, 3) if name == "heun" else steps)
    assert sched.sigmas[-1].item() == 0.0  # and lands on the clean image


def test_a_fractional_timestep_is_evaluated_at_the_sigma_the_scheduler_holds():
    """Euler with its own linspace spacing hands over fractional timesteps: the network then sees
    lambda = -2 ln sigma of the sample, and the oracle still gives x_0."""
    from diffusers import EulerDiscreteScheduler

    grid = DiffusionProcess(cosine_betas(100))
    sched = EulerDiscreteScheduler(num_train_timesteps=100, trained_betas=grid.betas.numpy(), final_sigmas_type="zero")
    sched.set_timesteps(7)
    assert any(not float(t).is_integer() for t in sched.timesteps)
    x0 = x0_images()
    model = LogSNROracle(x0)
    out = run_scheduler(sched, Denoiser(model, grid), torch.randn(x0.shape, generator=torch.Generator()), True)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)
    expected = -2 * torch.log(sched.sigmas[:-1].double())
    got = torch.tensor([lam[0].item() for lam in model.log_snr], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)


# ----------------------------------------------------------------- budgets


@pytest.mark.parametrize("name", ALL_SOLVERS)
def test_solver_evaluations_is_the_number_of_network_calls(name):
    process = DiffusionProcess(linear_betas(60))
    for steps in range(3 if name == "heun" else 1, 13):
        model = CountingModel()
        sample_batch(name, model, process, (1, 3, 8, 8), torch.Generator().manual_seed(0), steps)
        assert model.calls == network_evaluations(name, steps, 60) <= steps
        if name in SOLVERS:
            assert solver_evaluations(name, steps) == model.calls
    assert solver_evaluations("heun", 10) == 9 and solver_evaluations("heun", 9) == 9
    assert network_evaluations("ddpm", 10, 60) == 60


@pytest.mark.parametrize("name, steps, pattern", [
    ("heun", 2, r"heun: eval\.sampler_steps must be >= 3 for heun \(N steps take 2N - 1 network evaluations.*, got 2"),
    ("dpmpp_2m", 50, r"dpmpp_2m: eval\.sampler_steps must be <= T - 1 = 49 for dpmpp_2m .*, got 50"),
    ("unipc", 50, r"unipc: eval\.sampler_steps must be <= T - 1 = 49 .*, got 50"),
    ("euler", 0, r"euler: eval\.sampler_steps must be >= 1, got 0"),
    ("adaptive", 51, r"adaptive: eval\.sampler_steps must be <= diffusion\.T=50 .*, got 51"),
])
def test_a_budget_a_sampler_cannot_spend_is_one_line(name, steps, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        sample_batch(name, NoiseModel(), DiffusionProcess(linear_betas(50)), (1, 3, 8, 8), torch.Generator(), steps)
    assert "\n" not in str(info.value)


def test_sampler_steps_problem_limits():
    assert sampler_steps_problem("ddpm", 10**6, 10) is None
    assert sampler_steps_problem("ddim", 10, 10) is None and sampler_steps_problem("adaptive", 10, 10) is None
    assert sampler_steps_problem("heun", 10, 10) is None and sampler_steps_problem("heun", 3, 10) is None
    for name in ("dpmpp_2m", "unipc", "euler"):
        assert sampler_steps_problem(name, 9, 10) is None and sampler_steps_problem(name, 10, 10) is not None


def test_an_unknown_sampler_is_one_line():
    with pytest.raises(ValueError, match=r"eval\.sampler must be one of .*, got 'lms'"):
        solver_evaluations("lms", 10)


# ----------------------------------------------------------------- schedules diffusers cannot take


def _tiny_first_beta(T: int = 100) -> torch.Tensor:
    b = linear_betas(T).clone()
    b[0] = 1e-9  # valid in float64 (abar_0 < 1), but 1 - 1e-9 == 1 in float32
    return b


def _underflowing(T: int = 20) -> torch.Tensor:
    return torch.full((T,), 0.999, dtype=torch.float64)  # abar_19 = 1e-60: fine in float64, 0 in float32


@pytest.mark.parametrize("betas, why", [
    (_tiny_first_beta(), r"abar\[0\] = 1 does not decrease \(beta\[0\] = 1e-09 is below float32's resolution\)"),
    (_underflowing(), r"abar\[\d+\] underflows to 0"),
], ids=["tiny_beta", "underflow"])
@pytest.mark.parametrize("name", DIFFUSERS_SOLVERS)
def test_a_schedule_diffusers_cannot_hold_in_float32_is_refused_in_one_line(name, betas, why):
    process = DiffusionProcess(betas)  # a valid schedule of the project
    with pytest.raises(ValueError, match=rf"^{name} cannot take this schedule: diffusers keeps abar_t in float32, "
                                         rf"where {why}; sample it with ddpm or ddim \(float64\)$"):
        sample_batch(name, NoiseModel(), process, (1, 3, 8, 8), torch.Generator(), 5)
    out = ddim_sample(NoiseModel(), process, (1, 3, 8, 8), torch.Generator(), steps=5)  # float64: fine
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------- diffusers' DDIM = the project's DDIM


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("eta, clip", [(0.0, True), (0.0, False), (0.5, True)])
def test_diffusers_ddim_takes_the_projects_ddim_step(schedule, eta, clip):
    """diffusers' DDIMScheduler (trained_betas, set_alpha_to_one, clip_sample = the clip rule with
    use_clipped_model_output) steps exactly as ddim_sample. Its t_prev is t - T // S, so it is given the
    project's ddim_timesteps on a T where their spacing is T // S (T = 21, 5 steps: 20, 15, 10, 5, 0)."""
    from diffusers import DDIMScheduler

    T, steps = 21, 5
    process = DiffusionProcess(SCHEDULES[schedule](T))
    ts = ddim_timesteps(T, steps)
    assert ts == [20, 15, 10, 5, 0]
    sched = DDIMScheduler(num_train_timesteps=T, trained_betas=process.betas.numpy(), clip_sample=clip,
                          set_alpha_to_one=True, prediction_type="epsilon", thresholding=False)
    sched.set_timesteps(4)
    assert T // sched.num_inference_steps == 5
    sched.timesteps = torch.tensor(ts)
    model, shape = NoiseModel(), (2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    for i, t in enumerate(ts):
        eps = model(x, process.noise_cond(torch.full((shape[0],), t)))
        noise = torch.randn(shape, generator=g) if eta > 0 and i + 1 < len(ts) else None
        x = sched.step(eps, t, x, eta=eta, use_clipped_model_output=True, variance_noise=noise).prev_sample
    ours = ddim_sample(model, process, shape, torch.Generator().manual_seed(0), steps=steps, eta=eta, clip_x0=clip)
    torch.testing.assert_close(x, ours, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------- scheduler_config.json


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: loading a local config must not download."""

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_scheduler_config_round_trips_through_diffusers(tmp_path, no_network, schedule):
    import diffusers

    betas = SCHEDULES[schedule](1000)
    save_schedule(tmp_path / "schedule.json", betas, source=schedule)
    data = json.loads((tmp_path / DIFFUSERS_CONFIG).read_text())
    assert data["num_train_timesteps"] == 1000 and data["prediction_type"] == "epsilon"
    assert data["trained_betas"] == betas.tolist() and data["_akod"]["source"] == schedule
    assert not list(tmp_path.glob("*.tmp"))
    abar = DiffusionProcess(betas).abar
    for cls in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler",
                "HeunDiscreteScheduler", "DDIMScheduler"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no "config attributes ... not expected"
            sched = getattr(diffusers, cls).from_pretrained(tmp_path)
        assert sched.config.num_train_timesteps == 1000 and sched.config.prediction_type == "epsilon", cls
        assert torch.equal(sched.alphas_cumprod, torch.cumprod(1 - betas.float(), 0)), cls
        torch.testing.assert_close(sched.alphas_cumprod.double(), abar, rtol=1e-4, atol=0, msg=cls)
    dpm = diffusers.DPMSolverMultistepScheduler.from_pretrained(tmp_path)
    dpm.set_timesteps(10)
    assert int(dpm.timesteps[0]) == 999  # linspace: from pure noise


def test_a_loaded_config_samples_like_the_project(tmp_path):
    """The exported schedule in diffusers' hands is the schedule the project samples with."""
    import diffusers

    betas = dko_betas(200)
    save_schedule(tmp_path / "schedule.json", betas)
    loaded = diffusers.DPMSolverMultistepScheduler.from_pretrained(tmp_path, algorithm_type="dpmsolver++",
                                                                   final_sigmas_type="zero")
    loaded.set_timesteps(6)
    ours = build_scheduler("dpmpp_2m", DiffusionProcess(betas), 6)
    assert torch.equal(loaded.timesteps, ours.timesteps) and torch.equal(loaded.sigmas, ours.sigmas)


# ----------------------------------------------------------------- the adaptive sampler


def test_adaptive_with_weight_zero_is_dpmpp_2m_on_the_common_grid():
    """w = 0 is uniform in log-SNR: the same N + 1 levels and the same 2M update as diffusers' dpmpp_2m
    on the common grid, where round(linspace(0, T-1, N+1)) hits grid steps exactly (T = 41, N = 5)."""
    grid, train = common_grid(41), DiffusionProcess(cosine_betas(41))
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    den = Denoiser(NoiseModel(), train, grid)
    ours = adaptive_sample(den, x_T, 5, weight=0.0)
    sched = build_scheduler("dpmpp_2m", grid, 5)
    assert sched.timesteps.tolist() == [40, 32, 24, 16, 8]
    theirs = run_scheduler(sched, den, x_T, False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_adaptive_steps_follow_each_images_local_variance():
    """A smooth image and a textured one: each gets its own log-SNR sequence, rising to below lambda_max,
    from the same pure-noise start, and both are recovered exactly by the oracle."""
    smooth = torch.linspace(-0.5, 0.5, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32)
    textured = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x0 = torch.cat([smooth, textured])
    grid = common_grid(1000)
    trace: list[torch.Tensor] = []
    model = LogSNROracle(x0)
    out = adaptive_sample(Denoiser(model, grid), torch.randn(x0.shape, generator=torch.Generator()), 10, trace=trace)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)
    lam = torch.stack(trace, 1)  # [2, 10]
    assert len(model.log_snr) == 10
    assert torch.all(lam[:, 0] == grid.log_snr[-1].item())
    assert torch.all(lam[:, 1:] > lam[:, :-1]) and torch.all(lam < LMAX)
    assert (lam[0] - lam[1]).abs().max() > 0.5  # per image
    # The smooth image's local variance meets the noise's later (higher log-SNR): its steps lie higher.
    assert lam[0, -1] > lam[1, -1]


def test_adaptive_is_reproducible_finite_and_in_range(tiny_model_config, perturb_zero_init):
    """On the tiny AKOD U-Net (MSFI reads the per-image neighbour columns of the conditioning)."""
    from akod_ray.models.unet import UNet

    torch.manual_seed(0)
    model = perturb_zero_init(UNet(tiny_model_config)).eval()
    process = DiffusionProcess(dko_betas(1000))
    run = lambda seed: sample(model, process, 3, torch.Generator().manual_seed(seed), sampler="adaptive",  # noqa: E731
                              steps=4, image_size=32, grid=common_grid(1000), kernel_size=5)
    a, b, c = run(0), run(0), run(1)
    assert torch.isfinite(a).all() and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_next_logsnr_rule():
    lam = torch.tensor([-10.0, -3.0, 2.0], dtype=torch.float64)
    vx, ve = torch.tensor([0.01, 0.3, 0.9]), torch.tensor([0.95, 0.9, 0.9])
    vx, ve = vx.double(), ve.double()
    # one interval left: the end; w = 0: an equal share of the log-SNR left
    torch.testing.assert_close(next_logsnr(lam, 9.0, 1, vx, ve), torch.full_like(lam, 9.0))
    torch.testing.assert_close(next_logsnr(lam, 9.0, 4, vx, ve, weight=0.0), lam + (9.0 - lam) / 4)
    # w = 1: an equal share of the predicted change of log sigma_local^2 (the third image has none: log-SNR decides)
    nxt = next_logsnr(lam, 9.0, 4, vx, ve, weight=1.0)

    def log_f(x):
        return torch.log(torch.sigmoid(x) * vx + torch.sigmoid(-x) * ve)

    share = (log_f(nxt) - log_f(lam)) / (log_f(torch.full_like(lam, 9.0)) - log_f(lam))
    torch.testing.assert_close(share[:2], torch.full((2,), 0.25, dtype=torch.float64))
    assert nxt[2].item() == pytest.approx(2.0 + 7.0 / 4)
    assert torch.all(nxt > lam) and torch.all(nxt < 9.0)


def test_adaptive_refuses_a_kernel_larger_than_the_image():
    with pytest.raises(ValueError, match=r"adaptive: dko\.kernel_size 7 exceeds the image size \(4, 4\)"):
        sample_batch("adaptive", NoiseModel(), DiffusionProcess(cosine_betas(20)), (1, 3, 4, 4), torch.Generator(), 3)


def test_a_fixed_schedule_run_writes_its_schedule_in_both_formats_at_start(tmp_path, monkeypatch):
    """train_fixed writes schedule.json and scheduler_config.json into the run folder before training
    (Ray and the trainer are stubbed: only what happens before the fit is checked)."""
    import diffusers

    from akod_ray.config import load_config
    from akod_ray.diffusion.schedules import load_schedule
    from akod_ray.training import trainer

    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=fixed", "diffusion.schedule=cosine", "diffusion.T=100",
                             "data.source=procedural", "eval.sampler_steps=10"])
    seen = {}

    def fit(_):
        seen["files"] = sorted(p.name for p in cfg.run_dir.iterdir())

    monkeypatch.setattr(trainer, "ensure_ray", lambda cfg: None)
    monkeypatch.setattr(trainer, "build_trainer", lambda *a, **k: None)
    monkeypatch.setattr(trainer, "loop_config_for", lambda *a, **k: {})
    monkeypatch.setattr(trainer, "fit", fit)
    monkeypatch.setattr(trainer, "read_metrics", lambda run_dir: [])
    monkeypatch.setattr(trainer, "last_record", lambda records: {})
    trainer.train_fixed(cfg)
    assert {"schedule.json", DIFFUSERS_CONFIG} <= set(seen["files"])
    assert torch.equal(load_schedule(cfg.run_dir / "schedule.json", 100), cosine_betas(100))
    sched = diffusers.UniPCMultistepScheduler.from_pretrained(cfg.run_dir)
    assert torch.equal(sched.alphas_cumprod, torch.cumprod(1 - cosine_betas(100).float(), 0))


# ----------------------------------------------------------------- one way into sampling


def test_sampling_modules_import_downwards_only():
    """samplers.py <- solvers.py, adaptive.py <- dispatch.py: no module imports one above it (no loop), and
    the dispatcher knows every sampler name the config accepts."""
    import ast

    from akod_ray.config import SAMPLERS as CONFIG_SAMPLERS

    layer = {"samplers": 0, "solvers": 1, "adaptive": 1, "dispatch": 2}
    root = Path(__file__).resolve().parents[1] / "akod_ray" / "diffusion"
    for name, level in layer.items():
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {node.module.rsplit(".", 1)[1] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("akod_ray.diffusion.")}
        above = {m for m in imported if layer.get(m, -1) >= level and m != name}
        assert not above, f"{name}.py imports {above} (same layer or above)"
    assert SAMPLERS == CONFIG_SAMPLERS


def test_the_dispatcher_takes_a_diffusers_scheduler_object():
    """A scheduler handed over samples on its own grid; the project's dpmpp_2m is the same scheduler by name."""
    process = DiffusionProcess(linear_betas(100))
    sched = build_scheduler("dpmpp_2m", process, 6)
    by_object = sample(NoiseModel(), process, 3, torch.Generator().manual_seed(0), sampler=sched, steps=6, image_size=8)
    by_name = sample(NoiseModel(), process, 3, torch.Generator().manual_seed(0), sampler="dpmpp_2m", steps=6,
                     image_size=8)
    assert torch.equal(by_object, by_name)
    with pytest.raises(ValueError, match="a sampler is a name from .* or a diffusers scheduler, got int"):
        sample(NoiseModel(), process, 1, torch.Generator(), sampler=3)
