"""FastStep (the compiled / captured training step) against the reference train_step.

Every comparison runs the same steps side by side from the same weights: a learning rate that
changes at every step (warm-up), two micro-batches, an active gradient clip, Min-SNR weights,
and a schedule change in the middle (the AKOD arm changes it every segment). Eager and the
emulated capture path must match train_step bit for bit (the captured AdamW reads its learning
rate from a float32 device tensor, so its reference gets the float32-rounded rate); the
Inductor-compiled U-Net to float rounding.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from akod_ray.config import TrainConfig
from akod_ray.diffusion.process import TABLE_COND, TABLE_SQRT_ABAR, TABLE_SQRT_ONE_MINUS_ABAR, TABLE_WEIGHT, DiffusionProcess
from akod_ray.diffusion.schedules import cosine_betas, linear_betas
from akod_ray.errors import ConfigError, TrainingDivergedError
from akod_ray.models.unet import UNet
from akod_ray.training import fast_step as fast_step_module
from akod_ray.training.ema import EMA
from akod_ray.training.fast_step import COMPILE_MODES, FastStep, resolve_compile, use_channels_last
from akod_ray.training.step import StepOptions, lr_at, make_optimizer, train_step

pytestmark = pytest.mark.usefixtures("torch_single_thread")

T = 1000


def images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def small_model(tiny_model_config, perturb_zero_init):
    torch.manual_seed(0)
    return perturb_zero_init(UNet(tiny_model_config, image_size=16))


SCHEDULES = [DiffusionProcess(linear_betas(T)), DiffusionProcess(cosine_betas(T))]


def batches(step: int) -> list[torch.Tensor]:
    return list(images(4, seed=100 + step).split(2))


def process_at(step: int) -> DiffusionProcess:
    return SCHEDULES[0] if step < 2 else SCHEDULES[1]  # a new schedule from step 2 on


def f32(x: float) -> float:
    """x rounded to float32: a captured AdamW reads its learning rate from a float32 device tensor."""
    return float(torch.tensor(x, dtype=torch.float32))


def run_reference(model, opts: StepOptions, steps: int = 4, lr: float = 5e-3, f32_lr: bool = False,
                  optimizer=make_optimizer):
    """train_step, with the EMA update and the per-step learning rate the loop uses (rounded to
    float32 with ``f32_lr``: what the captured step's AdamW reads)."""
    opt = optimizer(model, lr, 0.0)
    ema = EMA(model, 0.9)
    out = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = f32(lr_at(step, lr, steps)) if f32_lr else lr_at(step, lr, steps)
        m = train_step(model, process_at(step), batches(step), opt, opts, torch.Generator().manual_seed(step))
        ema.update(model)
        out.append((m["loss"].item(), m["grad_norm"].item()))
    return out, ema


def run_fast(model, opts: StepOptions, steps: int = 4, lr: float = 5e-3, optimizer=make_optimizer, **kw):
    opt = optimizer(model, lr, 0.0)
    ema = EMA(model, 0.9)
    runner = FastStep(model, opt, opts, T, ema=ema, **kw)
    out = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr, steps)
        m = runner(batches(step), process_at(step), torch.Generator().manual_seed(step))
        out.append((m["loss"].item(), m["grad_norm"].item()))
    return out, ema, runner, opt


def assert_same_weights(a, b, exact: bool = True, **tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if exact:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, msg=lambda m: f"{name}: {m}", **tol)


OPTS = StepOptions(min_snr_gamma=5.0, bf16=False, grad_clip=0.05)


# ----------------------------------------------------------------- tables


@pytest.mark.parametrize("gamma", [None, 5.0])
def test_step_tables_hold_exactly_what_training_loss_reads(gamma):
    process = SCHEDULES[1]
    tables = process.step_tables(gamma)
    t = torch.arange(T)
    x = torch.zeros(T, 3, 2, 2)
    assert tables.shape == (T, 7) and tables.dtype == torch.float32
    assert torch.equal(tables[:, TABLE_SQRT_ABAR], process.extract(process.sqrt_abar, t, x).flatten())
    assert torch.equal(tables[:, TABLE_SQRT_ONE_MINUS_ABAR], process.extract(process.sqrt_one_minus_abar, t, x).flatten())
    assert torch.equal(tables[:, TABLE_COND], process.noise_cond(t))
    weights = process.loss_weights(t, gamma)
    assert torch.equal(tables[:, TABLE_WEIGHT], torch.ones(T) if weights is None else weights)
    if gamma is not None:  # Min-SNR-5 clips the weight of the low-noise steps only
        assert tables[0, TABLE_WEIGHT] < 1e-3 and tables[-1, TABLE_WEIGHT] == 1.0


# ----------------------------------------------------------------- eager and captured: bit for bit


@pytest.mark.parametrize("emulate_capture", [False, True], ids=["eager", "captured"])
def test_fast_step_is_train_step_bit_for_bit(small_model, emulate_capture):
    ref_model, fast_model = copy.deepcopy(small_model), copy.deepcopy(small_model)
    ref, ref_ema = run_reference(ref_model, OPTS, f32_lr=emulate_capture)
    fast, fast_ema, runner, opt = run_fast(fast_model, OPTS, compile="eager", _emulate_capture=emulate_capture)

    assert fast == ref  # losses and gradient norms, every step
    assert ref[0][1] > OPTS.grad_clip  # the clip was active
    assert_same_weights(fast_model, ref_model)
    assert all(torch.equal(a, b) for a, b in zip(fast_ema.shadow, ref_ema.shadow))
    assert runner.mean_loss().item() == pytest.approx(sum(loss for loss, _ in ref) / len(ref), rel=1e-6)
    moved = max((p - q).abs().max().item() for p, q in zip(fast_model.parameters(), small_model.parameters()))
    assert moved > 1e-3  # the steps did something
    # The optimizer looks as the loop left it: float lr, not capturable (checkpoints stay plain).
    assert all(isinstance(g["lr"], float) and not g.get("capturable", False) for g in opt.param_groups)
    assert runner.describe()["captured"] is emulate_capture


@pytest.mark.parametrize("emulate_capture", [False, True], ids=["eager", "captured"])
def test_with_dropout_each_step_draws_its_masks_from_its_own_seed(tiny_model_config, perturb_zero_init, emulate_capture):
    """Dropout 0.1: FastStep seeds the global generator right before the step runs (after the capture's
    warm-up, which draws masks too), so it is train_step with the same ``rng_seed``, bit for bit."""
    import dataclasses

    torch.manual_seed(0)
    model = perturb_zero_init(UNet(dataclasses.replace(tiny_model_config, dropout=0.1), image_size=16))
    ref_model, fast_model = copy.deepcopy(model), copy.deepcopy(model)
    ref_lr = f32(1e-3) if emulate_capture else 1e-3  # a captured AdamW reads a float32 learning rate
    ref_opt, opt = make_optimizer(ref_model, ref_lr, 0.0), make_optimizer(fast_model, 1e-3, 0.0)
    runner = FastStep(fast_model, opt, OPTS, T, compile="eager", _emulate_capture=emulate_capture)
    for step in range(3):
        torch.manual_seed(1000 + step)  # whatever the global generator holds before a step does not matter
        a = train_step(ref_model, process_at(step), batches(step), ref_opt, OPTS, torch.Generator().manual_seed(step),
                       rng_seed=77 + step)
        torch.manual_seed(2000 + step)
        b = runner(batches(step), process_at(step), torch.Generator().manual_seed(step), rng_seed=77 + step)
        assert a["loss"].item() == b["loss"].item() and a["grad_norm"].item() == b["grad_norm"].item()
    assert_same_weights(fast_model, ref_model)


def test_an_infinite_gradient_norm_with_a_finite_loss_is_a_divergence(small_model):
    opt = make_optimizer(small_model, 1e-3, 0.0)
    runner = FastStep(small_model, opt, OPTS, T, compile="eager")
    calls = []  # backward passes: two micro-batches a step; the third is step 1's first
    next(small_model.parameters()).register_hook(
        lambda g: torch.full_like(g, float("inf")) if calls.append(1) or len(calls) == 3 else g)
    losses = [runner(batches(s), process_at(s), torch.Generator().manual_seed(s))["loss"].item() for s in range(3)]
    assert all(math.isfinite(x) for x in losses[:2])  # step 2's loss was finite; its clipped gradient was NaN
    with pytest.raises(TrainingDivergedError, match=r"^training diverged: gradient norm is inf at step 11$"):
        runner.read_loss(step=12)  # the loop's step 12 was the runner's third


def test_schedule_change_rewrites_the_tables_in_place_without_recapture(small_model, monkeypatch):
    captures = []
    real = FastStep._capture_graph
    monkeypatch.setattr(FastStep, "_capture_graph", lambda self: captures.append(1) or real(self))
    opt = make_optimizer(small_model, 1e-3, 0.0)
    runner = FastStep(small_model, opt, OPTS, T, compile="eager", _emulate_capture=True)
    address = runner.tables.data_ptr()
    for step in range(4):
        runner(batches(step), process_at(step), torch.Generator().manual_seed(step))
        assert runner.tables.data_ptr() == address
        assert torch.equal(runner.tables, process_at(step).step_tables(OPTS.min_snr_gamma))
    assert len(captures) == 1


def test_loading_optimizer_state_recaptures_and_stays_exact(small_model):
    """optimizer.load_state_dict replaces the state tensors a graph reads: the next call recaptures."""
    ref_model, fast_model = copy.deepcopy(small_model), copy.deepcopy(small_model)
    ref_opt, opt = make_optimizer(ref_model, f32(1e-3), 0.0), make_optimizer(fast_model, 1e-3, 0.0)
    runner = FastStep(fast_model, opt, OPTS, T, compile="eager", _emulate_capture=True)
    for step in range(3):
        if step == 2:
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            assert runner._graph is None
        a = train_step(ref_model, process_at(step), batches(step), ref_opt, OPTS, torch.Generator().manual_seed(step))
        b = runner(batches(step), process_at(step), torch.Generator().manual_seed(step))
        assert a["loss"].item() == b["loss"].item()
    assert_same_weights(fast_model, ref_model)


@pytest.mark.parametrize("emulate_capture", [False, True], ids=["eager", "captured"])
def test_a_branch_rollout_is_undone_in_place(small_model, monkeypatch, emulate_capture):
    """snapshot / restore: train a branch with another schedule from the trunk's weights, then
    continue the trunk exactly as if the branch never ran, without recapturing."""
    captures = []
    real = FastStep._capture_graph
    monkeypatch.setattr(FastStep, "_capture_graph", lambda self: captures.append(1) or real(self))
    trunk_only, with_branch = copy.deepcopy(small_model), copy.deepcopy(small_model)
    runs = []
    for model, branch in ((trunk_only, False), (with_branch, True)):
        opt = make_optimizer(model, 1e-3, 0.0)
        runner = FastStep(model, opt, OPTS, T, ema=EMA(model, 0.9), compile="eager", _emulate_capture=emulate_capture)
        losses = []
        for step in range(4):
            if branch and step == 2:
                snap = runner.snapshot()
                for j in range(3):
                    runner(batches(50 + j), SCHEDULES[1], torch.Generator().manual_seed(50 + j))
                runner.restore(snap)
            losses.append(runner(batches(step), process_at(step), torch.Generator().manual_seed(step))["loss"].item())
        runs.append((losses, runner.mean_loss(reset=False).item(), runner.mean_loss().item(), runner.ema.shadow))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] == runs[1][1] == runs[0][2]  # the branch's losses are not in the trunk's mean
    assert all(torch.equal(a, b) for a, b in zip(runs[0][3], runs[1][3]))  # nor in its EMA
    assert_same_weights(trunk_only, with_branch)
    assert len(captures) == (2 if emulate_capture else 0)  # one per runner


def test_bf16_autocast_matches_train_step(small_model):
    opts = StepOptions(min_snr_gamma=None, bf16=True, grad_clip=1.0)
    ref_model, fast_model = copy.deepcopy(small_model), copy.deepcopy(small_model)
    ref, _ = run_reference(ref_model, opts, steps=2)
    fast, *_ = run_fast(fast_model, opts, steps=2, compile="eager")
    assert fast == ref
    assert_same_weights(fast_model, ref_model)


def test_ddp_model_under_no_sync_matches_train_step(small_model, tmp_path):
    """The DDP path (all-reduce on the last micro-batch only), in a one-process gloo group."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ref_model, fast_model = DDP(copy.deepcopy(small_model)), DDP(copy.deepcopy(small_model))
        ref_opt, opt = make_optimizer(ref_model.module, 1e-3, 0.0), make_optimizer(fast_model.module, 1e-3, 0.0)
        lines = []
        runner = FastStep(fast_model, opt, OPTS, T, compile="reduce-overhead", log=lines.append)
        assert runner.mode == "default" and len(lines) == 1  # CPU: no CUDA graphs, said once
        runner.net = fast_model  # the DDP plumbing, without compiling (the compiled path has its own test)
        runner.compiled, runner._net_verified = False, True
        for step in range(2):
            a = train_step(ref_model, process_at(step), batches(step), ref_opt, OPTS, torch.Generator().manual_seed(step))
            b = runner(batches(step), process_at(step), torch.Generator().manual_seed(step))
            assert a["loss"].item() == b["loss"].item()
        assert_same_weights(fast_model.module, ref_model.module)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------- torch.compile (Inductor on the CPU)


class SmallDenoiser(torch.nn.Module):
    """GroupNorm, SiLU, convolutions and a noise-level input: the U-Net's kinds of layers, small
    enough for Inductor to compile on two busy cores in a test's time."""

    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 16)
        self.emb = torch.nn.Linear(1, 16)
        self.conv_out = torch.nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x, cond):
        h = self.conv_in(x) + self.emb(cond[:, :1] / 10)[:, :, None, None]
        return self.conv_out(torch.nn.functional.silu(self.norm(h)))


@pytest.mark.slow
@pytest.mark.parametrize("net", ["small_denoiser", "unet"])
def test_inductor_compiled_step_matches_the_eager_step(small_model, net, capsys):
    """Compiled on the CPU (about 25 s for the small net and 50-100 s for the tiny U-Net on two
    busy cores). Inductor fuses and reorders float ops, so to float rounding. SGD, not AdamW:
    the compiled part is the forward and backward, and SGD moves the weights in proportion to
    the gradients, where Adam's normalized update would blow up the rounding of the near-zero
    gradients of biases in front of a GroupNorm."""
    torch.manual_seed(0)
    model = small_model if net == "unet" else SmallDenoiser()
    ref_model, fast_model = copy.deepcopy(model), copy.deepcopy(model)
    sgd = lambda m, lr, wd: torch.optim.SGD(m.parameters(), lr=lr)  # noqa: E731
    ref, _ = run_reference(ref_model, OPTS, steps=3, lr=0.5, optimizer=sgd)
    fast, _, runner, _ = run_fast(fast_model, OPTS, steps=3, lr=0.5, optimizer=sgd, compile="default")
    assert runner.describe() == {"requested": "default", "mode": "default", "compiled": True, "captured": False,
                                 "fallback": None}
    assert "[akod]" not in capsys.readouterr().out  # no fallback line
    for (la, ga), (lb, gb) in zip(fast, ref):
        assert la == pytest.approx(lb, rel=1e-4)
        assert ga == pytest.approx(gb, rel=1e-3)
    assert_same_weights(fast_model, ref_model, exact=False, rtol=1e-4, atol=1e-6)
    moved = max((p - q).abs().max().item() for p, q in zip(fast_model.parameters(), model.parameters()))
    assert moved > 1e-3


def test_a_failed_compilation_prints_one_line_and_runs_eagerly(small_model, monkeypatch, capsys):
    def broken_compile(model, **kw):
        def call(*a, **k):
            raise RuntimeError("misaligned address\nsecond line of the error")
        return call

    monkeypatch.setattr(fast_step_module.torch, "compile", broken_compile)
    ref_model, fast_model = copy.deepcopy(small_model), copy.deepcopy(small_model)
    ref, _ = run_reference(ref_model, OPTS, steps=2)
    fast, _, runner, _ = run_fast(fast_model, OPTS, steps=2, compile="default")
    assert fast == ref  # the same draws, run again eagerly
    assert_same_weights(fast_model, ref_model)
    out = capsys.readouterr().out.splitlines()
    assert out == ["[akod] train.compile=default: torch.compile failed (RuntimeError: misaligned address); "
                   "the U-Net runs eagerly"]
    assert runner.describe()["compiled"] is False


def test_a_failed_capture_prints_one_line_and_the_step_runs_uncaptured(small_model, monkeypatch):
    def broken_record(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(FastStep, "_record", broken_record)
    ref_model, fast_model = copy.deepcopy(small_model), copy.deepcopy(small_model)
    ref, ref_ema = run_reference(ref_model, OPTS, steps=3)  # uncaptured: the loop's float lr
    lines = []
    fast, fast_ema, runner, _ = run_fast(fast_model, OPTS, steps=3, compile="eager", _emulate_capture=True,
                                         log=lines.append)
    assert lines == ["[akod] train.compile=eager: CUDA graph capture failed (RuntimeError: operation not permitted "
                     "when stream is capturing); steps run uncaptured"]
    assert fast == ref  # the warm-up was undone: weights, AdamW state, EMA
    assert_same_weights(fast_model, ref_model)
    assert all(torch.equal(a, b) for a, b in zip(fast_ema.shadow, ref_ema.shadow))
    assert runner.describe()["captured"] is False


# ----------------------------------------------------------------- no host synchronization, NaN at log intervals


@pytest.mark.parametrize("emulate_capture", [False, True], ids=["eager", "captured"])
def test_a_step_never_reads_a_tensor_on_the_host(small_model, monkeypatch, emulate_capture):
    opt = make_optimizer(small_model, 1e-3, 0.0)
    runner = FastStep(small_model, opt, OPTS, T, ema=EMA(small_model, 0.99), compile="eager",
                      _emulate_capture=emulate_capture)
    runner(batches(0), process_at(0), torch.Generator().manual_seed(0))  # capture (when emulated) outside the check

    def forbidden(self, *a, **k):
        raise AssertionError("host synchronization inside a step")

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for step in range(1, 4):
        for g in opt.param_groups:
            g["lr"] = 1e-3 * step
        runner(batches(step), process_at(step), torch.Generator().manual_seed(step))
    monkeypatch.undo()
    assert math.isfinite(runner.mean_loss().item())


@pytest.mark.parametrize("emulate_capture", [False, True], ids=["eager", "captured"])
def test_a_nan_in_any_step_is_caught_at_the_log_interval_naming_that_step(small_model, emulate_capture):
    opt = make_optimizer(small_model, 1e-3, 0.0)
    runner = FastStep(small_model, opt, OPTS, T, compile="eager", _emulate_capture=emulate_capture)
    runner(batches(0), process_at(0), torch.Generator().manual_seed(0))
    first = runner.read_loss(step=100)  # the loop's step 100 was the runner's first
    assert math.isfinite(first) and runner.read_loss(step=100) == first  # no step since: the same value
    for step in range(101, 105):  # a NaN in step 102's batch; the weights stay NaN after it
        micro = batches(step)
        if step == 102:
            micro[0][0, 0, 0, 0] = float("nan")
        runner(micro, process_at(step), torch.Generator().manual_seed(step))
    assert math.isnan(runner.mean_loss(reset=False).item())
    with pytest.raises(TrainingDivergedError, match=r"^training diverged: loss is nan at step 102$"):
        runner.read_loss(step=104)
    with pytest.raises(RuntimeError, match="no training step"):
        runner.mean_loss()


def test_a_schedule_of_another_length_is_refused(small_model):
    runner = FastStep(small_model, make_optimizer(small_model, 1e-3, 0.0), OPTS, T, compile="eager")
    with pytest.raises(ValueError, match="T=500 steps, this step was built for T=1000"):
        runner(batches(0), DiffusionProcess(linear_betas(500)), torch.Generator())


# ----------------------------------------------------------------- modes


@pytest.mark.parametrize("mode, device, distributed, expected", [
    ("auto", "cpu", False, "eager"),
    ("auto", "cuda", False, "reduce-overhead"),
    ("auto", "cuda", True, "default"),
    ("eager", "cuda", False, "eager"),
    ("default", "cpu", False, "default"),
    ("reduce-overhead", "cuda", False, "reduce-overhead"),
    ("reduce-overhead", "cpu", False, "default"),
    ("reduce-overhead", "cuda", True, "default"),
])
def test_resolve_compile(mode, device, distributed, expected):
    resolved, why = resolve_compile(mode, device, distributed)
    assert resolved == expected
    assert (why is None) == (mode == "auto" or resolved == mode)


def test_compile_modes_are_the_config_field_values():
    for mode in COMPILE_MODES:
        assert TrainConfig(compile=mode).compile == mode
    assert TrainConfig().compile == "auto"
    for bad in ("off", "max-autotune", False):
        with pytest.raises(ConfigError, match="train.compile must be one of"):
            TrainConfig(compile=bad)
    with pytest.raises(ValueError, match="train.compile"):
        resolve_compile("off", "cpu")


def test_channels_last_only_where_no_compiled_groupnorm_backward_runs_on_cuda():
    assert use_channels_last(True, "eager", "cuda") is True
    assert use_channels_last(True, "default", "cuda") is False
    assert use_channels_last(True, "reduce-overhead", "cuda") is False
    assert use_channels_last(True, "default", "cpu") is True
    assert use_channels_last(False, "eager", "cpu") is False


# ----------------------------------------------------------------- EMA


def test_ema_follows_parameters_whose_data_was_replaced(small_model):
    """The EMA lists the Parameter objects once; .to(memory_format) swaps their data, not them."""
    ema = EMA(small_model, 0.5)
    ema.update(small_model)
    small_model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        for p in small_model.parameters():
            p.add_(1.0)
    before = [s.clone() for s in ema.shadow]
    ema.update(small_model)
    for s, s0, p in zip(ema.shadow, before, small_model.parameters()):
        assert torch.equal(s, torch.lerp(s0, p.detach(), 0.5))


# ----------------------------------------------------------------- the caller's draws, weights, an objective


@pytest.mark.parametrize("emulate_capture", [False, True], ids=["eager", "captured"])
def test_given_t_and_noise_are_the_steps_draws(small_model, emulate_capture):
    """A step given the very t and noise it would have drawn is the same step, bit for bit (eager and the
    emulated capture path); the per-image losses of the step are kept on the device."""
    a, b = copy.deepcopy(small_model), copy.deepcopy(small_model)
    out_a, _, _, _ = run_fast(a, OPTS, compile="eager", _emulate_capture=emulate_capture)
    opt = make_optimizer(b, 5e-3, 0.0)
    runner = FastStep(b, opt, OPTS, T, compile="eager", ema=EMA(b, 0.9), _emulate_capture=emulate_capture)
    out_b = []
    for step in range(4):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, 5e-3, 4)
        gen = torch.Generator().manual_seed(step)
        t, noise = [], []
        for x in batches(step):
            t.append(torch.randint(0, T, (x.shape[0],), generator=gen))
            noise.append(torch.randn(x.shape, generator=gen))
        m = runner(batches(step), process_at(step), torch.Generator(), t=t, noise=noise)
        out_b.append((m["loss"].item(), m["grad_norm"].item()))
        assert [x.shape for x in runner.last_losses] == [(2,), (2,)]
    assert out_a == out_b
    assert_same_weights(a, b)
    with pytest.raises(ValueError, match="both t and noise"):
        runner(batches(0), process_at(0), torch.Generator(), t=t)


def test_per_image_weights_scale_each_images_loss(small_model):
    """Weights of 1 change nothing; doubling every weight doubles the loss (the mean of weight x loss)."""
    a, b = copy.deepcopy(small_model), copy.deepcopy(small_model)
    ra = FastStep(a, make_optimizer(a, 1e-3, 0.0), OPTS, T)
    rb = FastStep(b, make_optimizer(b, 1e-3, 0.0), OPTS, T)
    gen = torch.Generator().manual_seed(0)
    t = [torch.randint(0, T, (2,), generator=gen) for _ in range(2)]
    noise = [torch.randn(2, 3, 16, 16, generator=gen) for _ in range(2)]
    la = ra(batches(0), SCHEDULES[0], t=t, noise=noise)["loss"]
    lb = rb(batches(0), SCHEDULES[0], t=t, noise=noise, weights=[torch.full((2,), 2.0)] * 2)["loss"]
    assert lb.item() == pytest.approx(2 * la.item(), rel=1e-6)
    c = copy.deepcopy(small_model)
    rc = FastStep(c, make_optimizer(c, 1e-3, 0.0), OPTS, T)
    lc = rc(batches(0), SCHEDULES[0], t=t, noise=noise, weights=[torch.ones(2)] * 2)["loss"]
    assert lc.item() == la.item()


def test_an_objective_with_parameters_of_its_own_is_stepped_with_the_model(small_model):
    from akod_ray.training.adaptation import EDM2Weighting

    objective = EDM2Weighting(lr=1e-2)
    runner = FastStep(small_model, make_optimizer(small_model, 1e-3, 0.0), StepOptions(None, False, 1.0), T,
                      objective=objective, _emulate_capture=True)
    assert not runner.capture  # an objective with parameters is never captured
    before = objective.linear.weight.detach().clone()
    for step in range(3):
        runner(batches(step), SCHEDULES[0], torch.Generator().manual_seed(step))
    assert not torch.equal(objective.linear.weight, before)
