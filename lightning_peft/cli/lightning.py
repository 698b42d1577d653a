"""LightningCLI for `lpeft fit | validate | test | predict`: PeftCausalLM + SFTDataModule + Trainer."""

from __future__ import annotations

import logging
import os
import sys
import typing
import warnings
from typing import Any, NoReturn

from jsonargparse import Namespace, namespace_to_dict
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lightning_peft import allocator, cpu_precision
from lightning_peft.adapters import adalora_total_step, is_adalora
from lightning_peft.callbacks import AdapterCheckpoint, MetricHistory, PredictionWriter, RunSummary
from lightning_peft.cli.config_errors import one_line
from lightning_peft.data import SFTDataModule
from lightning_peft.errors import ConfigError
from lightning_peft.models import auto_precision
from lightning_peft.module import PeftCausalLM
from lightning_peft.run_folder import run_dir, share_version
from lightning_peft.tokens import tokenizer_source

log = logging.getLogger(__name__)


class LpeftArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, reporting a rejected config as one `ConfigError` line instead of usage + detail."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        # Parsers jsonargparse builds for nested classes try alternatives and catch ArgumentError: leave them be.
        if not self.exit_on_error:
            super().error(message, ex)
        # Our own errors (raised by a link's compute function, say) already say what to fix, and keep their exit code.
        if ex is not None and _raised_by_lightning_peft(ex):
            raise ex
        parser = getattr(ex, "subcommand_parser", None) or self
        args = list(getattr(self, "args", None) or sys.argv[1:])
        # The full detail stays in the chain, for `lpeft --debug`.
        raise ConfigError(one_line(message, args, parser.section_keys)) from (ex or ValueError(message))

    def section_keys(self, section: str, class_path: str | None) -> list[str]:
        """Keys of `section` relative to it: a nested class's init arguments when `class_path` names one."""
        if class_path is not None:
            return _class_keys(class_path)
        prefix = f"{section}." if section else ""
        keys = [a.dest[len(prefix) :] for a in self._actions if a.dest.startswith(prefix)]
        keys = [k for k in keys if k not in ("help", "config", "print_config")]
        if section and not keys:  # a class section (`model`, `data`): its default class's arguments
            action = next((a for a in self._actions if a.dest == section), None)
            hint = getattr(action, "_typehint", None)
            classes = [c for c in (typing.get_args(hint) or (hint,)) if isinstance(c, type) and c is not type(None)]
            return _class_keys(f"{classes[0].__module__}.{classes[0].__qualname__}") if classes else []
        return keys


def _raised_by_lightning_peft(err: BaseException) -> bool:
    seen: BaseException | None = err
    while seen is not None:
        if type(seen).__module__.startswith("lightning_peft"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _class_keys(class_path: str) -> list[str]:
    from jsonargparse import ArgumentParser
    from jsonargparse._util import import_object

    parser = ArgumentParser(exit_on_error=False)
    try:
        parser.add_class_arguments(import_object(class_path))
    except Exception:  # no suggestion is better than losing the error being reported
        return []
    return [a.dest for a in parser._actions if a.dest not in ("help", "config")]


class LpeftCLI(LightningCLI):
    """LightningCLI with the tokenizer linked to the model and precision chosen for the hardware.

    `trainer.precision` left unset (null) means auto: bf16-mixed on GPUs that support it; for `fit` on a CPU with
    native bf16, whichever of bf16-mixed and 32-true ran a training step of the model faster
    (`lightning_peft.cpu_precision`); 32-true elsewhere.
    `fit` checkpoints with `AdapterCheckpoint` (adapter folders, never the frozen base) instead of Lightning's
    default `ModelCheckpoint`, unless the config names a checkpoint callback or `trainer.enable_checkpointing`
    is false; `--ckpt_path last` then resumes from its newest complete checkpoint.
    """

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data module tokenizes with the model's own tokenizer (an adapter_path's, which carries the chat template
        # and added tokens it was trained with, else the base's); one setting names both.
        parser.link_arguments(
            ("model.init_args.model_name_or_path", "model.init_args.adapter_path"),
            "data.init_args.tokenizer",
            compute_fn=tokenizer_source,
        )
        # The model adds the template's missing tokens to its vocabulary as the data module does to its tokenizer.
        parser.link_arguments("data.init_args.chat_template", "model.init_args.chat_template")

    @override
    def before_instantiate_classes(self) -> None:
        if problem := allocator.setting_problem(os.environ):
            raise ConfigError(problem + ".")
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.get("precision") is None:
            config.trainer.precision = self._auto_precision(config)
        _fill_adalora_total_step(config)
        _default_loggers(config)
        hint = allocator.missing_allocator_hint(os.environ) if self.subcommand == "fit" else None
        if hint and getattr(rank_zero_only, "rank", 0) == 0:
            log.info(hint)

    def _auto_precision(self, config: Any) -> str:
        """`auto_precision()`, except where `fit` runs on a CPU with native bf16: there a measured choice."""
        precision = auto_precision()
        on_cpu = config.trainer.get("accelerator") in (None, "auto", "cpu")
        if self.subcommand != "fit" or precision != cpu_precision.FP32 or not on_cpu:
            return precision
        if not cpu_precision.probe_enabled():
            return precision
        model, data = config.model.get("init_args") or config.model, config.data.get("init_args") or config.data
        adapter = model.get("adapter")
        return cpu_precision.measured_precision(
            model.get("model_name_or_path"),
            model.get("quantization") or "none",
            data.get("max_length") or 512,
            adapter=namespace_to_dict(adapter) if isinstance(adapter, Namespace) else adapter,
        )

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        if self.subcommand == "fit":
            kwargs = _with_adapter_checkpoint(self.config_init[self.subcommand].get("trainer") or {}, kwargs)
        trainer = super().instantiate_trainer(**kwargs)
        share_version(trainer)  # one run, one folder, also for several CSV/TensorBoard loggers
        # `lpeft predict` always writes its completions; a PredictionWriter in the config says where and how.
        if self.subcommand == "predict" and not any(isinstance(c, PredictionWriter) for c in trainer.callbacks):
            trainer.callbacks.append(PredictionWriter())
        # Steps, tokens, time and logged metrics of the run, for `lpeft publish`'s model card, whatever the loggers.
        if self.subcommand == "fit":
            for kind in (RunSummary, MetricHistory):
                if not any(isinstance(c, kind) for c in trainer.callbacks):
                    trainer.callbacks.append(kind())
        return trainer


class RunConfigSaver(SaveConfigCallback):
    """Save `fit`'s config as `config.yaml` in the run folder (`lightning_peft.run_folder`), not in
    `trainer.log_dir`: with W&B or MLflow first that is the logger's `save_dir`, shared by every run."""

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            super().setup(trainer, pl_module, stage)
            return
        if self.already_saved:
            return
        folder = run_dir(trainer)  # every process: the first call is a collective
        if trainer.is_global_zero:
            path = str(folder / self.config_filename)
            self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=self.multifile)
            self.save_config(trainer, pl_module, stage)
        self.already_saved = True


def _with_adapter_checkpoint(trainer_config: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Add a default `AdapterCheckpoint` to the trainer's callbacks, before the Trainer would add its own
    `ModelCheckpoint` (which cannot be told apart from one the user asked for afterwards)."""
    if trainer_config.get("enable_checkpointing") is False:
        return kwargs
    callbacks = kwargs.get("callbacks", trainer_config.get("callbacks"))
    callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
    if any(isinstance(c, Checkpoint) for c in callbacks):
        return kwargs
    return {**kwargs, "callbacks": [*callbacks, AdapterCheckpoint()]}


def _fill_adalora_total_step(config: Any) -> None:
    """AdaLoRA needs its schedule length when its config is built, which jsonargparse does before the Trainer
    exists: take it from `trainer.max_steps`, as the module does from Python."""
    adapter = config.model.init_args.get("adapter") if config.get("model") else None
    if not hasattr(adapter, "class_path") or not is_adalora(adapter.class_path):
        return
    if adapter.init_args.get("total_step") is None:
        max_steps = config.trainer.get("max_steps")
        adapter.init_args.total_step = adalora_total_step(max_steps, option="model.adapter.init_args.total_step")


def _default_loggers(config: Any) -> None:
    """With no logger configured, log to CSV and, when installed, to TensorBoard (Lightning picks one or the other).

    The model card does not depend on it: `MetricHistory` records the metrics whatever the loggers.
    """
    if config.trainer.get("logger") not in (None, True):
        return
    import importlib.util

    from jsonargparse import Namespace

    root = config.trainer.get("default_root_dir") or "."
    classes = ["CSVLogger"]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        classes.append("TensorBoardLogger")
    config.trainer.logger = [
        Namespace(class_path=f"lightning.pytorch.loggers.{name}", init_args=Namespace(save_dir=root))
        for name in classes
    ]


def run_lightning_cli(args: list[str]) -> LightningCLI:
    """Run LightningCLI on `args` (a subcommand and its options), as `lpeft <subcommand>` does."""
    # Under `lpeft`, sys.argv holds these same arguments, and must keep them: DDP launches its other processes
    # by re-running sys.argv. LightningCLI warns about seeing both.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
        return LpeftCLI(
            PeftCausalLM,
            SFTDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            seed_everything_default=42,
            save_config_callback=RunConfigSaver,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "lpeft", "default_env": False},
            parser_class=LpeftArgumentParser,
            auto_configure_optimizers=False,
        )
