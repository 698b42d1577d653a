"""EleutherAI lm-evaluation-harness glue: score a base model and its adapters on the harness's tasks.

    from lightning_peft.evaluation import evaluate, resolve_tasks

    tasks = resolve_tasks(["examples/tasks/capitals.yaml", "arc_easy"])   # checked before any model loads
    results = evaluate(model, tokenizer, tasks, limit=50, chat=True)      # the harness's results dict

Modules: `harness` (task specs and local task files, one harness run over a loaded model), `report` (the side by
side table and the JSON file of `lpeft eval`). Importing this package imports neither torch nor the harness.
"""

from __future__ import annotations

from lightning_peft.evaluation.harness import Tasks, evaluate, resolve_tasks
from lightning_peft.evaluation.report import format_table, metric_rows, results_payload, write_results

__all__ = ["Tasks", "evaluate", "format_table", "metric_rows", "resolve_tasks", "results_payload", "write_results"]
