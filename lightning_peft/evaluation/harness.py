"""One lm-evaluation-harness run over an already-loaded model, and the task specs it runs.

The model is the one lightning-peft loaded (aliases, 4-/8-bit quantization, adapters pulled from a registry),
handed to the harness's `HFLM` as an object: the harness computes every score, we only choose what it runs on.
Tasks are the harness's names (`arc_easy`) or local task files (`path/to/task.yaml`, the harness's YAML format):
a local file's relative `data_files` are read from the file's own folder, so it works from any working folder.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_peft.errors import ConfigError, require

log = logging.getLogger(__name__)

_YAML_SUFFIXES = (".yaml", ".yml")


@dataclass
class Tasks:
    """Harness tasks checked by `resolve_tasks`: what to pass to the harness, and the task manager to look them up.

    Attributes:
        specs: Harness task names, and local task files as the config dicts the harness builds tasks from.
        labels: What the user gave for each spec (a name or a file), for messages.
        include_path: The folders of the local task files (their siblings may define groups or includes).
        include_defaults: Whether the harness's own task index is needed (a named task was asked for).
    """

    specs: list[str | dict[str, Any]]
    labels: list[str]
    include_path: list[str] = field(default_factory=list)
    include_defaults: bool = False
    _manager: Any = field(default=None, repr=False)

    @property
    def manager(self) -> Any:
        """The harness's `TaskManager` (indexing its own ~15,000 tasks takes half a minute: only when needed)."""
        if self._manager is None:
            from lm_eval.tasks import TaskManager

            self._manager = TaskManager(include_path=self.include_path or None, include_defaults=self.include_defaults)
        return self._manager


def resolve_tasks(specs: Sequence[str], *, option: str = "--tasks") -> Tasks:
    """Check task names and local task files, and build every task once, before any model is loaded.

    Raises:
        MissingDependencyError: lm-eval is not installed.
        FileNotFoundError: a local task file (a spec ending in .yaml/.yml, or naming a path) does not exist.
        ConfigError: an unknown task name, a file that is no task definition, a task whose data cannot be read.
    """
    require("lm_eval", "lm-eval", "evaluation with lm-evaluation-harness")
    specs = [s.strip() for s in specs if s.strip()]
    if not specs:
        raise ConfigError(f"`{option}` names no task; give harness task names or task YAML files, comma-separated.")
    tasks = Tasks(specs=[], labels=[])
    for spec in specs:
        if _is_path(spec):
            config = _local_task(Path(spec), option)
            tasks.specs.append(config)
            folder = str(Path(spec).resolve().parent)
            if folder not in tasks.include_path:
                tasks.include_path.append(folder)
        else:
            tasks.specs.append(spec)
            tasks.include_defaults = True
        tasks.labels.append(spec)
    _check_names(tasks, option)
    for spec, label in zip(tasks.specs, tasks.labels, strict=True):
        _build(tasks, spec, label, option)
    return tasks


def _is_path(spec: str) -> bool:
    return spec.lower().endswith(_YAML_SUFFIXES) or "/" in spec or "\\" in spec or Path(spec).is_file()


def _local_task(path: Path, option: str) -> dict[str, Any]:
    """The task file as the harness reads it (includes merged, `!function`s imported), data paths made absolute."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if not path.is_file():
        raise FileNotFoundError(f"`{option}` {path}: no such task file; give a harness task YAML or a task name.")
    try:
        config = load_yaml(path, resolve_func=True)
    except Exception as err:
        raise ConfigError(f"`{option}` {path}: not a readable task YAML ({_first_line(err)}).") from err
    if "task" not in config and "group" not in config:
        raise ConfigError(f"`{option}` {path}: a task YAML needs a `task:` (or `group:`) key naming the task.")
    kwargs = config.get("dataset_kwargs") or {}
    if "data_files" in kwargs:
        config["dataset_kwargs"] = {**kwargs, "data_files": _absolute(kwargs["data_files"], path, option)}
    return config


def _absolute(files: Any, task_file: Path, option: str) -> Any:
    """`data_files` (a path, a list, or split → path(s)) with each relative path read from the task's folder."""
    if isinstance(files, dict):
        return {split: _absolute(value, task_file, option) for split, value in files.items()}
    if isinstance(files, (list, tuple)):
        return [_absolute(value, task_file, option) for value in files]
    if not isinstance(files, str) or "://" in files or any(c in files for c in "*?["):
        return files  # URLs and glob patterns go to `datasets` as they are
    path = Path(files).expanduser()
    candidate = path if path.is_absolute() else task_file.resolve().parent / path
    if candidate.is_file():
        return str(candidate.resolve())
    if path.is_file():  # relative to the working folder, as the harness itself reads it
        return str(path.resolve())
    raise FileNotFoundError(
        f"`{option}` {task_file}: dataset_kwargs.data_files {files!r} is not a file (looked in {candidate.parent}); "
        "give a path relative to the task YAML."
    )


def _check_names(tasks: Tasks, option: str) -> None:
    names = [s for s in tasks.specs if isinstance(s, str)]
    if not names:
        return
    known = set(tasks.manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(
                f"`{option}` {name!r} is not a task lm-evaluation-harness knows; {hint}`lm-eval ls tasks` lists "
                "them, and a local task is the path of its YAML file."
            )


def _build(tasks: Tasks, spec: str | dict[str, Any], label: str, option: str) -> None:
    """Build the task once (its data read, its prompts checked), so a broken task fails before models load."""
    try:
        tasks.manager.load_task_or_group([spec])
    except Exception as err:
        raise ConfigError(f"`{option}` {label}: the harness cannot build this task ({_first_line(err)}).") from err


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: Tasks,
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    chat: bool = False,
    chat_template: str | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Run `tasks` on `model` with the harness (`HFLM` over the model object) and return the harness's results.

    Args:
        model: A loaded causal LM (a transformers model, or a `PeftModel` with the adapter to score active).
        tokenizer: Its tokenizer.
        tasks: From `resolve_tasks`.
        limit: The most documents per task (below 1: a fraction of each task's documents).
        num_fewshot: Examples in each prompt (default: each task's own setting).
        batch_size: Requests per forward pass.
        chat: Render prompts with the chat template (few-shot examples as turns).
        chat_template: The template to render them with (default: the tokenizer's), e.g. the adapter's own.
        log_samples: Keep each document's prompt, reply and scores in `results["samples"]`.

    Returns:
        The dict of `lm_eval.simple_evaluate`: `results` (task → `metric,filter` → value, with `_stderr`
        entries), `higher_is_better`, `n-shot`, `n-samples`, `configs`, `versions` ...
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    _quiet_harness()
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        chat_template_args={"chat_template": chat_template} if chat and chat_template else None,
    )
    results = simple_evaluate(
        model=lm,
        tasks=list(tasks.specs),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=tasks.manager,
        apply_chat_template=chat,
        fewshot_as_multiturn=chat,
        log_samples=log_samples,
    )
    if results is None:  # the harness returns None on ranks other than 0
        raise RuntimeError("lm-evaluation-harness returned no results (not the main process).")
    return results


def _quiet_harness() -> None:
    """The harness warns about things the user chose (a model object, default aggregations): keep its errors."""
    logger = logging.getLogger("lm_eval")
    if not logging.getLogger("lightning_peft").isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.ERROR)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
