"""LightningCLI for `lpeft fit | validate | test | predict`: PeftCausalLM + SFTDataModule + Trainer."""

from __future__ import annotations

import logging
import sys

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lightning_peft.data import SFTDataModule
from lightning_peft.models import auto_precision
from lightning_peft.module import PeftCausalLM

log = logging.getLogger(__name__)


class LpeftCLI(LightningCLI):
    """LightningCLI with the tokenizer linked to the model and precision chosen for the hardware.

    `trainer.precision` left unset (null) means auto: bf16-mixed on GPUs that support it, 32-true elsewhere.
    """

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data module tokenizes with the model's own tokenizer; one setting names both.
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.tokenizer")

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.get("precision") is None:
            config.trainer.precision = auto_precision()


def run_lightning_cli(args: list[str]) -> LightningCLI:
    """Run LightningCLI on `args` (a subcommand and its options), as `lpeft <subcommand>` does."""
    # LightningCLI warns when sys.argv also holds arguments; under `lpeft` they are the same ones.
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return LpeftCLI(
            PeftCausalLM,
            SFTDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            seed_everything_default=42,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "lpeft", "default_env": False},
            auto_configure_optimizers=False,
        )
    finally:
        sys.argv = argv
