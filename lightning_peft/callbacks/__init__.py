"""Lightning callbacks for PEFT runs (one per file)."""

from lightning_peft.callbacks.fit_report import FitReport

__all__ = ["FitReport"]
