"""A headless matplotlib figure, and the figure as PNG bytes.

Why here: the report's plots, the sweep summary's plot and the training loop's loss.png are
drawn on servers and CI machines without a display, so matplotlib must use its Agg back end
before pyplot loads, and every figure must be closed (pyplot keeps each one open otherwise).
matplotlib is imported only here, and only when a figure is made: nothing that merely imports
engine pays for it.
"""

from __future__ import annotations

import io


def figure(nrows: int = 1, ncols: int = 1, *, size: tuple[float, float], dpi: int = 100, **subplots):
    """``(figure, axes)`` as ``plt.subplots`` returns them, on the Agg back end."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=size, dpi=dpi, **subplots)


def png(fig) -> bytes:
    """The figure laid out tight, as PNG bytes at its own dpi; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi="figure")
    plt.close(fig)
    return buf.getvalue()
