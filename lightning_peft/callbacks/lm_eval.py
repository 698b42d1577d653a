"""`LmEvalCallback`: lm-evaluation-harness tasks on the base before training and on the adapter when it ends.

The scores go to every logger of the run (so `metrics.jsonl`, TensorBoard, W&B ... hold them) under
`lm_eval/<task>/<metric>`: the base's at step 0, the adapter's at the last step (and, with `every_validation`, at
each validation in between). The metric's history is then the before/after comparison. At the end the pair is
printed side by side and written to `<run folder>/lm_eval.json` (each task's metrics, base and adapter values and
data set), which `lpeft publish` puts into the card and the manifest.
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
        every_validation: Also score the adapter after each validation run (not the sanity check), so the
            metric history shows when the tasks improved or regressed, not only where training ended.
    """

    def __init__(
        self,
        tasks: list[str],
        limit: float | None = None,
        num_fewshot: int | None = None,
        batch_size: int = 8,
        chat: bool = False,
        before: bool = True,
        every_validation: bool = False,
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
        self.every_validation = every_validation
        self._scored_step: int | None = None  # the step of the last score, so fit end does not repeat it
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
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_validation and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._score_adapter(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning_peft.atomic import write_text
        from lightning_peft.evaluation import metric_rows
        from lightning_peft.evaluation.report import before_after, format_table
        from lightning_peft.run_files import LM_EVAL_FILE
        from lightning_peft.run_folder import run_dir

        if self._scored_step != trainer.global_step:  # a validation at the last step already scored it
            self._score_adapter(trainer, pl_module)
        # The pair, with each task's data set, for `lpeft publish` (the card's model-index and table).
        records = before_after(self.before or None, self.after)
        write_text(run_dir(trainer) / LM_EVAL_FILE, json.dumps({"tasks": records}, indent=2) + "\n")
        results = {"before": self.before, "after": self.after} if self.before else {"after": self.after}
        table = format_table(metric_rows(results), list(results))
        log.info("lm-eval before and after training (%s):\n%s", run_dir(trainer) / LM_EVAL_FILE, table)

    def _score_adapter(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.after = self._evaluate(pl_module)
        self._scored_step = trainer.global_step
        self._log(trainer, self.after, step=trainer.global_step)

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
