"""The training step at the accelerator's pace: built once, called once per optimizer step.

:func:`akod_ray.training.step.train_step` is the reference: :class:`FastStep` computes the same
step (bit for bit when eager on the CPU; tests/test_fast_step.py), but a GPU no longer waits for
the host. Where a step's time went on one H200 (issue 13; paper-width U-Net, batch 64): about
2,160 kernel launches, the noise tables copied to the device at every call, and ``loss.item()``
at every step, so the GPU was busy 27 ms of a 60 ms step. Here:

* the per-step constants (sqrt(abar_t), sqrt(1 - abar_t), the noise conditioning, the Min-SNR
  weight: :meth:`DiffusionProcess.step_tables`) live in one device tensor, overwritten in place
  when the schedule changes (the AKOD arm: every segment), so compiled and captured code keeps
  reading the same address and never needs recompiling or recapturing for a new schedule;
* nothing inside a step waits for the device: losses add up on the device, the first step whose
  loss or gradient norm is not finite is noted on the device, and the caller reads both
  (:meth:`FastStep.read`) at log intervals and before checkpoints, where it checks for divergence;
* every random draw of a step is under the caller's control: t and noise come from the caller's
  generator, and what draws from the global generator (dropout) draws after it was seeded with
  the caller's ``rng_seed``, right before the step runs (after any capture warm-up);
* a step may be given its t and noise (the caller drew them: the DKO's per-image noise levels, an
  importance sampler), per-image loss weights, and an :class:`Objective` with parameters of its own
  (EDM2's learned uncertainty, :mod:`akod_ray.training.adaptation`); the per-image losses of the
  last step stay on the device (:attr:`FastStep.last_losses`);
* ``train.compile`` (:data:`COMPILE_MODES`) chooses how the U-Net and the step run:

  eager            eager PyTorch ("eager", not "off": YAML reads an unquoted off as false).
  default          the U-Net compiled by torch.compile (Inductor: fused elementwise kernels, no
                   per-forward re-cast of weights); loss, clipping, AdamW and EMA eager (a few
                   fused multi-tensor kernels).
  reduce-overhead  default, and on CUDA the whole step (forward, backward, clipping, fused AdamW,
                   EMA, loss sum) captured once in one CUDA graph and replayed: one launch a step
                   instead of thousands. Only the t and noise draws, the input copy and the seeding
                   of the global generator run outside it, so steps stay reproducible from the
                   loop's per-step seeds (a replay reads the generator's seed and offset as they
                   are when it starts: PyTorch's graph-safe Philox state). On a CPU (no CUDA
                   graphs) or under DDP (capturing DDP's all-reduce needs NCCL settings that Ray
                   Train's workers do not make) it runs as default.
  auto             reduce-overhead on one CUDA device, default under DDP on CUDA, eager on a CPU
                   (Inductor on this project's CPU compiled for minutes and was no faster:
                   BENCHMARKS.md).

  When compilation or capture fails, the step prints one line saying so and continues in the next
  simpler mode (captured eager U-Net, then uncaptured), with the same draws.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn as nn

from akod_ray.diffusion.process import TABLE_WIDTH, DiffusionProcess
from akod_ray.training.ema import EMA
from akod_ray.training.step import Divergence, StepOptions

COMPILE_MODES = ("auto", "eager", "default", "reduce-overhead")  # train.compile
CAPTURE_WARMUP = 3  # eager steps on a side stream before a capture (PyTorch's CUDA graph notes: lazy state, cuBLAS/cuDNN setup)


def resolve_compile(mode: str, device: torch.device | str, distributed: bool = False) -> tuple[str, str | None]:
    """The mode that runs for ``train.compile=mode`` on ``device``, and why it is not the one asked
    for (None when it is, or when ``auto`` chose)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"train.compile must be one of {COMPILE_MODES}, got {mode!r}")
    cuda = torch.device(device).type == "cuda"
    if mode == "auto":
        return ("default" if distributed else "reduce-overhead") if cuda else "eager", None
    if mode == "reduce-overhead" and not cuda:
        return "default", f"CUDA graphs need a CUDA device, this is {torch.device(device).type}: running default"
    if mode == "reduce-overhead" and distributed:
        return "default", "no CUDA graph capture under DDP (its all-reduce is not captured): running default"
    return mode, None


def use_channels_last(requested: bool, mode: str, device: torch.device | str) -> bool:
    """train.channels_last, except for a compiled U-Net on CUDA: NCHW there. torch 2.11 compiled
    the channels_last GroupNorm backward into a kernel that failed with CUDA "misaligned address"
    (issue 13, batch 256, H200); NCHW compiled and ran. ``mode`` is a resolved mode."""
    return requested and not (mode in ("default", "reduce-overhead") and torch.device(device).type == "cuda")


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    msg = f"{type(e).__name__}: {text[0] if text else ''}"
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


class FastStep:
    """One optimizer step over micro-batches of x_0 in [-1, 1]: ``step(micro_batches, process, generator)``.

    The same contract as :func:`train_step` (t then noise drawn per micro-batch from
    ``generator``, the global generator seeded with ``rng_seed`` for dropout, L_simple or Min-SNR,
    DDP all-reduce on the last micro-batch only, gradient clipping, the optimizer step), plus the
    EMA update when ``ema`` is given. Returns
    ``{"loss", "grad_norm"}`` as device tensors; reading them is the caller's choice (and its
    synchronization). The learning rate is read from ``optimizer.param_groups`` at every call,
    so a loop that sets ``group["lr"]`` keeps working; ``optimizer.load_state_dict`` drops a
    captured graph (new state tensors), which is recaptured at the next call.

    ``_emulate_capture`` (tests only) runs the capture path on a CPU: warm-up, state restore,
    static input buffers and the lr tensor, with the "graph" replayed as eager calls.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, opts: StepOptions, T: int,
                 compile: str = "auto", ema: EMA | None = None, log: Callable[[str], None] | None = None,
                 _emulate_capture: bool = False, objective: "Objective | None" = None):
        self.model = model
        self.objective = objective  # per-image loss -> scalar, with parameters of its own (None: the mean)
        self.raw = getattr(model, "module", model)
        self.params = list(self.raw.parameters())
        self.optimizer = optimizer
        self.opts = opts
        self.ema = ema
        self.T = T
        self.device = self.params[0].device
        self.log = log or (lambda s: print(s, flush=True))
        self.requested = compile
        self.mode, why = resolve_compile(compile, self.device, distributed=hasattr(model, "no_sync"))
        self.fallback: str | None = None  # what failed, when something did
        if why:
            self._say(why)
        self.compiled = self.mode in ("default", "reduce-overhead")
        self.capture = (self.mode == "reduce-overhead" and self.device.type == "cuda") or _emulate_capture
        if self.capture and not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            self._say(f"capture needs Adam/AdamW (zero initial state), not {type(optimizer).__name__}: steps run uncaptured")
            self.capture = False
        if self.capture and objective is not None:
            self._say("a loss objective with parameters of its own is not captured: steps run uncaptured")
            self.capture = False
        self.net = torch.compile(model, dynamic=False) if self.compiled else model
        self._net_verified = not self.compiled  # the first forward/backward proves the compiled U-Net works
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution once

        self.tables = torch.zeros(T, TABLE_WIDTH, device=self.device)
        self._process: DiffusionProcess | None = None
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_steps = 0
        self._last_read = math.nan
        self._last_bad: Divergence | None = None
        self._calls = 0  # steps run (host count), and on the device: the same count, and the first non-finite one
        self._steps_run = torch.zeros((), dtype=torch.long, device=self.device)
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self._bad_grad = torch.zeros((), dtype=torch.bool, device=self.device)  # at _first_bad: the loss was finite, the gradient norm not
        self._bad_value = torch.zeros((), device=self.device)  # at _first_bad: the value that was not finite
        self._rng_seed: int | None = None  # the global generator's seed for the step being run
        self._weights: list[torch.Tensor | None] | None = None  # per-image loss weights of the step being run
        self.last_losses: list[torch.Tensor] = []  # per-image losses of the last step, per micro-batch (device)
        # capture state
        self._graph = None
        self._graph_key = None
        self._static: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._out: tuple[torch.Tensor, torch.Tensor] | None = None
        self._lr_dev = [torch.zeros((), device=self.device) for _ in optimizer.param_groups]
        self._lr_host: list[float | None] = [None] * len(optimizer.param_groups)
        self._hook = optimizer.register_load_state_dict_post_hook(lambda _opt: self.reset())

    # ------------------------------------------------------------------ public

    def __call__(self, micro_batches: list[torch.Tensor], process: DiffusionProcess,
                 generator: torch.Generator | None = None, rng_seed: int | None = None, *,
                 t: list[torch.Tensor] | None = None, noise: list[torch.Tensor] | None = None,
                 weights: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """One step. ``rng_seed``: the seed of the global generator (CPU and CUDA) for the step's own
        draws (dropout), set right before the step runs; None leaves the global generator as it is.

        ``t`` and ``noise`` (one tensor per micro-batch): the caller's draws, used instead of drawing
        from ``generator`` (both or neither); ``weights``: per-image loss weights (the loss is the mean
        of weight x loss)."""
        if process is not self._process:
            self._set_process(process)
        if not self.model.training:
            self.model.train()
        if (t is None) != (noise is None):
            raise ValueError("FastStep: give both t and noise, or neither")
        self._loss_steps += 1
        self._calls += 1
        self._rng_seed = rng_seed
        self._weights = weights
        if self.capture:
            if weights is not None:
                self._say("per-image loss weights are not captured: steps run uncaptured")
                self.capture = False
                self.reset()
            else:
                return self._captured_step(micro_batches, generator, t, noise)
        inputs = ([self._draw(x0, generator) for x0 in micro_batches] if t is None
                  else list(zip(micro_batches, t, noise)))
        self._seed_rng()
        loss, grad_norm = self._step(inputs)
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "grad_norm": grad_norm}

    def mean_loss(self, reset: bool = True) -> torch.Tensor:
        """The mean training loss over the steps since the last reset, as a device scalar (NaN or
        inf when any of those steps diverged: the sum carries it). Reading it (``.item()``) is the
        loop's synchronization point, once per log interval (and before a checkpoint, so that a
        diverged run never overwrites its last good one)."""
        if self._loss_steps == 0:
            raise RuntimeError("mean_loss: no training step since the last reset")
        mean = self._loss_sum / self._loss_steps
        if reset:
            self._loss_sum.zero_()
            self._loss_steps = 0
        return mean

    def read(self, step: int, reset: bool = True) -> tuple[float, Divergence | None]:
        """:meth:`mean_loss` on the host, and the first step whose loss or gradient norm was NaN or
        inf (counted back from ``step``, the last step run), or None: one synchronization. A
        non-finite gradient norm with a finite loss counts: clipping turns it into NaN weights and
        EMA (0 * inf). With no step since the last reset: what the last read returned."""
        if self._loss_steps == 0:
            return self._last_read, self._last_bad
        mean = self.mean_loss(reset)
        loss, first, bad_grad, value = torch.stack(
            [mean.double(), self._first_bad.double(), self._bad_grad.double(), self._bad_value.double()]).tolist()
        bad = None
        if first > 0:
            bad = Divergence(step - (self._calls - int(first)), "gradient norm" if bad_grad else "loss", value)
        elif not math.isfinite(loss):
            bad = Divergence(step, "loss", loss)
        self._last_read, self._last_bad = loss, bad
        return loss, bad

    def read_loss(self, step: int, reset: bool = True) -> float:
        """:meth:`read`, raising TrainingDivergedError naming the first bad step (one process; the
        training loop agrees on divergence across workers before it raises)."""
        loss, bad = self.read(step, reset)
        if bad is not None:
            raise bad.error()
        return loss

    def reset(self) -> None:
        """Forget a captured graph (it is recaptured at the next call): after anything replaced
        the tensors it reads, such as ``optimizer.load_state_dict``."""
        self._graph = self._graph_key = self._static = self._out = None

    def describe(self) -> dict:
        return {"requested": self.requested, "mode": self.mode, "compiled": self.compiled,
                "captured": self.capture, "fallback": self.fallback}

    # ------------------------------------------------------------------ the step itself

    def _say(self, what: str) -> None:
        self.log(f"[akod] train.compile={self.requested}: {what}")

    def _set_process(self, process: DiffusionProcess) -> None:
        if process.T != self.T:
            raise ValueError(f"the schedule has T={process.T} steps, this step was built for T={self.T}")
        self.tables.copy_(process.step_tables(self.opts.min_snr_gamma))  # in place: same address for compiled/captured code
        self._process = process

    def _draw(self, x0: torch.Tensor, generator: torch.Generator | None):
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return x0, t, noise

    def _autocast(self):
        if not self.opts.bf16:
            return contextlib.nullcontext()
        # Captured: no cast cache (PyTorch's CUDA graph notes). Otherwise the cache, as in train_step: a
        # weight used twice (the MSFI's three embeddings) is cast once, and its gradient rounds the same.
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, cache_enabled=not self.capture)

    def _loss(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, i: int = 0) -> torch.Tensor:
        """Mean L_simple (Min-SNR weighted when set) over one micro-batch, from the device tables; times the
        caller's per-image weights, or through the objective, when given. Keeps the per-image losses."""
        with self._autocast():
            weighted = self.opts.min_snr_gamma is not None
            per_image = DiffusionProcess.table_loss(self.net, self.tables, x0, t, noise, weighted)
        self.last_losses.append(per_image.detach())
        if self._weights is not None:
            per_image = per_image * self._weights[i].to(per_image.dtype)
        if self.objective is not None:
            return self.objective(per_image, self.tables[t])
        return per_image.mean()

    def _forward_backward(self, inputs) -> torch.Tensor:
        n = len(inputs)
        total = None
        self.last_losses = []
        for i, (x0, t, noise) in enumerate(inputs):
            last = i == n - 1 or not hasattr(self.model, "no_sync")
            with contextlib.nullcontext() if last else self.model.no_sync():
                loss = self._loss(x0, t, noise, i)
                (loss / n).backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total / n

    def _checked_forward_backward(self, inputs) -> torch.Tensor:
        """The forward/backward; the first time with a compiled U-Net, a failure to compile falls
        back to the eager U-Net (one line) and the same inputs run again."""
        if self._net_verified:
            return self._forward_backward(inputs)
        try:
            out = self._forward_backward(inputs)
        except Exception as e:  # Inductor/Dynamo raise many kinds; an eager failure re-raises below
            self.fallback = f"torch.compile failed ({_first_line(e)})"
            self._say(f"{self.fallback}; the U-Net runs eagerly")
            self.net, self.compiled = self.model, False
            self.optimizer.zero_grad(set_to_none=True)
            self._seed_rng()  # the failed attempt may have drawn dropout masks
            out = self._forward_backward(inputs)
        self._net_verified = True
        return out

    def _update(self, loss: torch.Tensor) -> torch.Tensor:
        """Clip, optimizer step, EMA, loss sum: multi-tensor kernels, no host synchronization."""
        if self.opts.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.opts.grad_clip)
        else:  # no clipping, but the metric stays the true norm
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        self.optimizer.step()
        if self.objective is not None:
            self.objective.step()
        if self.ema is not None:
            self.ema.update(self.raw)
        self._loss_sum.add_(loss)
        self._steps_run.add_(1)
        finite_loss, finite_grad = torch.isfinite(loss), torch.isfinite(grad_norm)
        first = (self._first_bad < 0) & ~(finite_loss & finite_grad)  # the first bad step: noted once, on the device
        self._first_bad.copy_(torch.where(first, self._steps_run, self._first_bad))
        self._bad_grad.copy_(torch.where(first, finite_loss, self._bad_grad))
        self._bad_value.copy_(torch.where(first, torch.where(finite_loss, grad_norm.float(), loss.float()), self._bad_value))
        return grad_norm.detach()

    def _step(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        loss = self._checked_forward_backward(inputs)
        return loss, self._update(loss)

    def _seed_rng(self) -> None:
        """Seed the global generator (CPU and CUDA: dropout's masks) for the step about to run."""
        if self._rng_seed is not None:
            torch.manual_seed(self._rng_seed)

    # ------------------------------------------------------------------ whole-step CUDA graph

    def _captured_step(self, micro_batches, generator, given_t=None, given_noise=None) -> dict[str, torch.Tensor]:
        key = tuple((tuple(x.shape), x.dtype) for x in micro_batches) + (self.ema.decay if self.ema else None,)
        if key != self._graph_key:
            self.reset()
            self._static = [(torch.empty_like(x),  # the batch's memory format
                             torch.empty(x.shape[0], dtype=torch.long, device=x.device),
                             torch.empty(x.shape, dtype=x.dtype, device=x.device)) for x in micro_batches]
        # This step's inputs into the static buffers, drawn in train_step's order (t, then noise), or the caller's.
        for i, ((x0, t, noise), x) in enumerate(zip(self._static, micro_batches)):
            x0.copy_(x)
            if given_t is not None:
                t.copy_(given_t[i])
                noise.copy_(given_noise[i])
                continue
            torch.randint(0, self.T, t.shape, generator=generator, out=t)
            torch.randn(noise.shape, generator=generator, out=noise)
        self._sync_lr()
        if key != self._graph_key:
            self._graph_key = key
            if not self._capture_graph():  # capture failed: this and later steps run uncaptured
                self.capture = False
                self._seed_rng()
                loss, grad_norm = self._step(self._static)
                self.optimizer.zero_grad(set_to_none=True)
                return {"loss": loss, "grad_norm": grad_norm}
        self._seed_rng()  # after the warm-up and capture, which drew from it too
        if self._graph != "emulated":
            self._graph.replay()
        else:  # on a CPU (tests): what a replay does, eagerly (grads are rewritten, not accumulated)
            self.optimizer.zero_grad(set_to_none=True)
            with self._lr_as_tensors():
                self._out = self._step(self._static)
        loss, grad_norm = self._out
        return {"loss": loss.clone(), "grad_norm": grad_norm.clone()}  # the graph's outputs change at the next replay

    def _sync_lr(self) -> None:
        """The captured AdamW reads lr from device tensors: refresh them from param_groups."""
        for i, group in enumerate(self.optimizer.param_groups):
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                self._lr_dev[i].copy_(lr)
                self._lr_host[i] = None
            elif lr != self._lr_host[i]:
                self._lr_dev[i].fill_(lr)  # a kernel with the value as argument: no synchronization
                self._lr_host[i] = lr

    @contextlib.contextmanager
    def _lr_as_tensors(self):
        """param_groups hold the device lr tensors (and capturable=True) only while the optimizer
        code runs for a capture; the rest of the time they keep plain floats (checkpoints, logs)."""
        saved = [(g["lr"], g.get("capturable", False)) for g in self.optimizer.param_groups]
        for g, lr in zip(self.optimizer.param_groups, self._lr_dev):
            g["lr"], g["capturable"] = lr, True
        try:
            yield
        finally:
            for g, (lr, cap) in zip(self.optimizer.param_groups, saved):
                g["lr"], g["capturable"] = lr, cap

    def _capture_graph(self) -> bool:
        """Warm up on the static inputs, put every state back as it was, capture one step."""
        snapshot = self.snapshot()
        cuda = self.device.type == "cuda"
        try:
            with self._lr_as_tensors():
                side = torch.cuda.Stream() if cuda else None
                if cuda:
                    side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                    for _ in range(CAPTURE_WARMUP):  # also compiles the U-Net (or falls back to eager)
                        self.optimizer.zero_grad(set_to_none=True)
                        self._step(self._static)
                if cuda:
                    torch.cuda.current_stream().wait_stream(side)
                self.restore(snapshot)
                # None grads during capture: backward allocates them from the graph's pool, and
                # every replay writes them afresh.
                self.optimizer.zero_grad(set_to_none=True)
                self._graph = self._record()
            return True
        except Exception as e:
            self.fallback = f"CUDA graph capture failed ({_first_line(e)})"
            self._say(f"{self.fallback}; steps run uncaptured")
            self._graph = None
            self.optimizer.zero_grad(set_to_none=True)
            self.restore(snapshot)
            return False

    def _record(self):
        """Capture one step on the static inputs (on a CPU, for tests: nothing to record)."""
        if self.device.type != "cuda":
            return "emulated"
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._out = self._step(self._static)
        return graph

    @torch.no_grad()
    def snapshot(self) -> dict:
        """Copies of everything a step changes: weights, buffers, optimizer state, EMA, the loss
        sum. With :meth:`restore`, a branch rollout trains from the trunk and undoes it without
        replacing a tensor (``load_state_dict`` would, and a captured graph would be recaptured)."""
        opt_state = {p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                     for p, s in self.optimizer.state.items()}
        return {"params": [p.detach().clone() for p in self.params],
                "buffers": [b.clone() for b in self.raw.buffers()],
                "opt_state": opt_state,
                "ema": [s.clone() for s in self.ema.shadow] if self.ema else [],
                "loss_sum": self._loss_sum.clone(), "loss_steps": self._loss_steps, "calls": self._calls,
                "steps_run": self._steps_run.clone(), "first_bad": self._first_bad.clone(),
                "bad_grad": self._bad_grad.clone(), "bad_value": self._bad_value.clone()}

    @torch.no_grad()
    def restore(self, snap: dict) -> None:
        """Back to :meth:`snapshot`, in place (a captured graph reads these addresses). Optimizer
        state created since is zeroed: AdamW's initial state (step 0, zero moments)."""
        for p, v in zip(self.params, snap["params"]):
            p.copy_(v)
        for b, v in zip(self.raw.buffers(), snap["buffers"]):
            b.copy_(v)
        for p, state in self.optimizer.state.items():
            saved = snap["opt_state"].get(p)
            for k, v in state.items():
                if not isinstance(v, torch.Tensor):
                    if saved is not None:
                        state[k] = saved[k]
                elif saved is not None and k in saved:
                    v.copy_(saved[k])
                else:
                    v.zero_()
        for s, v in zip(self.ema.shadow if self.ema else [], snap["ema"]):
            s.copy_(v)
        self._loss_sum.copy_(snap["loss_sum"])
        self._steps_run.copy_(snap["steps_run"])
        self._first_bad.copy_(snap["first_bad"])
        self._bad_grad.copy_(snap["bad_grad"])
        self._bad_value.copy_(snap["bad_value"])
        self._loss_steps, self._calls = snap["loss_steps"], snap["calls"]
