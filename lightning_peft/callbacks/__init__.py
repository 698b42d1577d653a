"""Lightning callbacks for PEFT runs (one per file)."""

from lightning_peft.callbacks.fit_report import FitReport
from lightning_peft.callbacks.prediction_writer import PredictionWriter

__all__ = ["FitReport", "PredictionWriter"]
