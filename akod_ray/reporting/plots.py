"""Report figures (matplotlib, Agg backend): quality against wall-clock per arm, and learned
noise schedules against the linear and cosine baselines."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from akod_ray.diffusion.schedules import cosine_betas, linear_betas  # noqa: E402

Curve = tuple[list[float], list[float]]  # (wall-clock seconds, metric values) of one run


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_metric_vs_time(curves: dict[str, list[Curve]], path: str | Path, ylabel: str, title: str,
                        target: float | None = None, log_y: bool = False) -> Path:
    """One colour per arm, one line per run of the arm (seeds), metric against wall-clock seconds."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (arm, runs) in enumerate(sorted(curves.items())):
        for j, (xs, ys) in enumerate(runs):
            ax.plot(xs, ys, color=colors[i % len(colors)], marker="o" if len(xs) < 30 else None, markersize=3,
                    alpha=0.9 if len(runs) == 1 else 0.7, label=arm if j == 0 else None)
    if target is not None:
        ax.axhline(target, color="0.3", linestyle="--", linewidth=1, label=f"target {target:g}")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("wall-clock (s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def log_snr(betas: torch.Tensor) -> torch.Tensor:
    """log-SNR_t = log(abar_t / (1 - abar_t))."""
    abar = torch.cumprod(1.0 - betas.double(), 0)
    return torch.log(abar) - torch.log1p(-abar)


def plot_schedules(learned: dict[str, torch.Tensor], path: str | Path) -> Path:
    """beta_t (log scale) and log-SNR_t of learned schedules against linear and cosine of the same T."""
    fig, (ax_b, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2))
    Ts = sorted({int(b.shape[0]) for b in learned.values()}) or [1000]
    for T in Ts:
        suffix = f" (T={T})" if len(Ts) > 1 else ""
        for name, fn, style in (("linear", linear_betas, "--"), ("cosine", cosine_betas, ":")):
            betas = fn(T)
            t = torch.arange(1, T + 1)
            ax_b.plot(t, betas, color="0.35", linestyle=style, label=name + suffix)
            ax_s.plot(t, log_snr(betas), color="0.35", linestyle=style, label=name + suffix)
    for label, betas in sorted(learned.items()):
        t = torch.arange(1, betas.shape[0] + 1)
        ax_b.plot(t, betas, linewidth=1.4, label=label)
        ax_s.plot(t, log_snr(betas), linewidth=1.4, label=label)
    ax_b.set_yscale("log")
    ax_b.set_xlabel("t")
    ax_b.set_ylabel("beta_t")
    ax_b.set_title("noise schedule beta_t")
    ax_s.set_xlabel("t")
    ax_s.set_ylabel("log-SNR_t = log(abar_t / (1 - abar_t))")
    ax_s.set_title("log-SNR")
    for ax in (ax_b, ax_s):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, Path(path))
