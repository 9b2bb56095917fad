"""The report's plots, as PNG bytes (drawn with engine.render.plot: headless, closed after use)."""

from __future__ import annotations

from engine.render.plot import figure, png


def _figure(width: float = 7.0, height: float = 3.4):
    """The report's look: one axes, no top and right spines, a light horizontal grid."""
    fig, ax = figure(size=(width, height), dpi=110)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", alpha=0.3)
    return fig, ax


def metric_bars(names: list[str], base: list[float | None], tuned: list[float | None], title: str) -> bytes:
    """Grouped bars, base vs fine-tuned, for metrics on a 0..1 scale."""
    fig, ax = _figure(max(5.0, 1.1 * len(names) + 2))
    x = list(range(len(names)))
    w = 0.38
    has_base = any(b is not None for b in base)
    if has_base:
        ax.bar([i - w / 2 for i in x], [b or 0 for b in base], w, label="base", color="#9aa5b1")
    ax.bar([i + (w / 2 if has_base else 0) for i in x], [t or 0 for t in tuned], w, label="fine-tuned", color="#2b6cb0")
    for i, t in enumerate(tuned):
        if t is not None:
            ax.text(i + (w / 2 if has_base else 0), t + 0.01, f"{t:.2f}", ha="center", fontsize=8)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.08)
    ax.set_title(title, fontsize=11)
    ax.legend(frameon=False, fontsize=9)
    return png(fig)


def loss_curve(steps: list[int], losses: list[float]) -> bytes:
    """Training loss per optimizer step."""
    return series_curve(steps, losses, ylabel="training loss", title="Training loss")


def series_curve(steps: list[int], values: list[float], *, ylabel: str, title: str) -> bytes:
    """One value per optimizer step (e.g. GRPO's mean reward of the sampled answers)."""
    fig, ax = _figure()
    ax.plot(steps, values, color="#2b6cb0", linewidth=1.6, marker="o" if len(steps) < 30 else None, markersize=3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    return png(fig)
