"""`FitReport`: validation metrics and sample generations before and after training, side by side."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as L
from typing_extensions import override

log = logging.getLogger(__name__)


class FitReport(L.Callback):
    """Measure the model before training starts and again when it ends, and log both side by side.

    Args:
        prompts: User messages to answer before and after training (rendered with the chat template).
        max_new_tokens: Length of each generated answer (greedy decoding).
        evaluate: Also run the validation set before and after (loss, perplexity, token accuracy).
    """

    def __init__(self, prompts: list[str] | None = None, max_new_tokens: int = 48, evaluate: bool = True) -> None:
        self.prompts = list(prompts or [])
        self.max_new_tokens = max_new_tokens
        self.evaluate = evaluate
        self.before: dict[str, Any] = {}
        self.after: dict[str, Any] = {}

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.before = self._measure(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.after = self._measure(trainer, pl_module)
        if trainer.is_global_zero:
            log.info("%s", self.format())

    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        result: dict[str, Any] = {}
        datamodule = trainer.datamodule
        if self.evaluate and datamodule is not None and _has_val_data(datamodule):
            loader = datamodule.val_dataloader()
            if len(loader):
                result["metrics"] = pl_module.evaluate(loader)
        result["generations"] = [pl_module.generate(p, max_new_tokens=self.max_new_tokens) for p in self.prompts]
        return result

    def format(self) -> str:
        """The before/after report as text."""
        lines = ["", "Before and after training"]
        before, after = self.before.get("metrics", {}), self.after.get("metrics", {})
        if before and after:
            lines.append(f"  {'metric':<10} {'before':>10} {'after':>10}")
            lines += [f"  {name:<10} {before[name]:>10.4f} {after[name]:>10.4f}" for name in before]
        pairs = zip(self.prompts, self.before.get("generations", []), self.after.get("generations", []), strict=False)
        for prompt, old, new in pairs:
            lines += [f"  prompt: {prompt}", f"    before: {_one_line(old)}", f"    after:  {_one_line(new)}"]
        return "\n".join(lines)


def _has_val_data(datamodule: Any) -> bool:
    # SFTDataModule sets val_dataloader to None when there is no validation data (Lightning then skips it).
    return callable(getattr(datamodule, "val_dataloader", None))


def _one_line(text: str) -> str:
    return " ".join(text.split())
