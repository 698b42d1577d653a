"""The training-loss curve of a run as a PNG, drawn with matplotlib (the optional `hub` extra).

The bytes are deterministic for the same points and the same matplotlib: the Agg backend, a fixed size and
DPI, the bundled DejaVu font, and no `Software`/date metadata in the file.
"""

from __future__ import annotations

import importlib.util
import io

LOSS_CURVE_FILE = "loss_curve.png"


def can_plot() -> bool:
    """Whether matplotlib is installed (`pip install 'lightning-peft[hub]'`)."""
    return importlib.util.find_spec("matplotlib") is not None


def loss_curve_png(train: list[tuple[int, float]], val: list[tuple[int, float]], title: str) -> bytes:
    """A PNG of the training loss (line) and the validation loss (markers) against the step."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    # A Figure without pyplot: no global state, no GUI backend, nothing left open.
    with matplotlib.rc_context({"font.family": "DejaVu Sans", "svg.hashsalt": "lpeft", "path.simplify": True}):
        figure = Figure(figsize=(6.4, 3.6), dpi=100)
        axes = figure.add_subplot()
        if train:
            axes.plot(*zip(*train, strict=True), label="train_loss", color="#1f77b4", linewidth=1.5)
        if val:
            axes.plot(*zip(*val, strict=True), label="val_loss", color="#d62728", marker="o", linestyle="--")
        axes.set(xlabel="step", ylabel="loss", title=title)
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
