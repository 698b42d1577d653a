"""Lightning callbacks for PEFT runs (one per file)."""

from lightning_peft.callbacks.adapter_checkpoint import AdapterCheckpoint
from lightning_peft.callbacks.adapter_merge import AdapterMerge
from lightning_peft.callbacks.fit_report import FitReport
from lightning_peft.callbacks.lm_eval import LmEvalCallback
from lightning_peft.callbacks.metric_history import MetricHistory
from lightning_peft.callbacks.prediction_writer import PredictionWriter
from lightning_peft.callbacks.run_summary import RunSummary

__all__ = [
    "AdapterCheckpoint",
    "AdapterMerge",
    "FitReport",
    "LmEvalCallback",
    "MetricHistory",
    "PredictionWriter",
    "RunSummary",
]
