"""`LmEvalCallback`: lm-evaluation-harness tasks on the base before training and on the adapter when it ends.

The scores go to every logger of the run (so `metrics.jsonl`, TensorBoard, W&B ... hold them) under
`lm_eval/<task>/<metric>`: the base's at step 0, the adapter's at the last step. The metric's history is then the
before/after comparison. At the end the pair is also written to `<run folder>/lm_eval.json` (each task's metrics,
base and adapter values and data set), which `lpeft publish` puts into the card and the manifest.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import lightning.pytorch as L
from typing_extensions import override

from lightning_peft.errors import ConfigError

log = logging.getLogger(__name__)


class LmEvalCallback(L.Callback):
    """Score the base before training and the adapter after it on harness tasks; log both through the loggers.

    Tasks are checked, and their data read, when the callback is built: a typo fails before the model loads.

    Args:
        tasks: Harness task names (`arc_easy`) or task YAML files (see `lpeft eval`).
        limit: The most documents per task (below 1: a fraction of each task).
        num_fewshot: Examples in each prompt (default: each task's own).
        batch_size: Requests per forward pass.
        chat: Render prompts with the tokenizer's chat template (the run's `data.chat_template` when it set one).
        before: Also score the base model (the adapter switched off) when fit starts.
    """

    def __init__(
        self,
        tasks: list[str],
        limit: float | None = None,
        num_fewshot: int | None = None,
        batch_size: int = 8,
        chat: bool = False,
        before: bool = True,
    ) -> None:
        from lightning_peft.evaluation import resolve_tasks

        if batch_size < 1:
            raise ConfigError(f"`batch_size`={batch_size} must be at least 1.")
        self.tasks = resolve_tasks(list(tasks), option="tasks")
        self.settings = dict(
            limit=int(limit) if limit is not None and limit >= 1 else limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            chat=chat,
        )
        self.before_fit = before
        self.before: dict[str, Any] = {}
        self.after: dict[str, Any] = {}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1:
            raise ConfigError(
                f"LmEvalCallback runs in one process; this run has {trainer.world_size}. Evaluate the saved "
                "adapter with `lpeft eval` instead."
            )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.before_fit:
            with pl_module.model.disable_adapter():
                self.before = self._evaluate(pl_module)
            self._log(trainer, self.before, step=0)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning_peft.atomic import write_text
        from lightning_peft.evaluation.report import before_after
        from lightning_peft.run_files import LM_EVAL_FILE
        from lightning_peft.run_folder import run_dir

        self.after = self._evaluate(pl_module)
        self._log(trainer, self.after, step=trainer.global_step)
        # The pair, with each task's data set, for `lpeft publish` (the card's model-index and table).
        records = before_after(self.before or None, self.after)
        write_text(run_dir(trainer) / LM_EVAL_FILE, json.dumps({"tasks": records}, indent=2) + "\n")

    def _evaluate(self, pl_module: L.LightningModule) -> dict[str, Any]:
        from lightning_peft.evaluation import evaluate

        model = pl_module.model
        was_training = model.training
        try:
            return evaluate(model, pl_module.tokenizer, self.tasks, **self.settings)
        finally:
            model.train(was_training)  # the harness switches the model to eval mode

    def _log(self, trainer: L.Trainer, results: dict[str, Any], step: int) -> None:
        from lightning_peft.evaluation import metric_rows

        metrics = {}
        for row in metric_rows({"run": results}):
            suffix = "" if row.filter == "none" else f"_{row.filter}"
            metrics[f"lm_eval/{row.task}/{row.metric}{suffix}"] = row.values["run"][0]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        log.info("lm-eval at step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
