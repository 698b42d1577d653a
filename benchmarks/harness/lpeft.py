"""System (e): lightning-peft, run exactly as `lpeft fit --config run.yaml` runs.

The worker calls the `lpeft` console entry point in-process with a generated config, so the run has everything
a user's run has: LightningCLI, `PeftCausalLM`, `SFTDataModule` reading the JSON Lines file (its tokenized form
comes from the data cache, as on any second run), the harness's precision, the default callbacks (`AdapterCheckpoint`,
`RunSummary`, the progress bar, model summary), the CSV logger and the adapter written when fit ends. The only
addition is `Recorder`, a callback that hands each step's batch and loss to the benchmark's recorder.

`RawLossLM` (system `lpeft-lora-packed-raw-loss`) trains with the raw loop's loss and nothing else per step, so
what it costs over the raw loop is the framework's alone. `InputGradCheckpointLM` (system
`lpeft-lora-packed-ckpt-true-input-grads`) is full checkpointing as lightning-peft ran it before `selective`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import yaml

from benchmarks.harness.common import LORA
from benchmarks.harness.raw import shifted_cross_entropy
from benchmarks.harness.recorder import StepRecorder
from lightning_peft import PeftCausalLM

ACTIVE: StepRecorder | None = None  # the worker's recorder, found by the callback the CLI instantiates


class RawLossLM(PeftCausalLM):
    """`PeftCausalLM` whose training step is the raw loop's: the loss from the full logits, no metrics, no logging."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return shifted_cross_entropy(self(batch).logits, batch["labels"])


class InputGradCheckpointLM(PeftCausalLM):
    """`PeftCausalLM` with full checkpointing as it was before `selective` existed: transformers' input-grad hook on
    the embeddings, so the first decoder layer also computes the gradient of its input (which nothing uses)."""

    def build_adapter(self, base_model: torch.nn.Module) -> torch.nn.Module:
        model = super().build_adapter(base_model)
        model.enable_input_require_grads()
        return model


class Recorder(L.Callback):
    """Reports each training step (batch, loss, end time) to the worker's `StepRecorder`."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ACTIVE.total_steps = int(trainer.estimated_stepping_batches)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        ACTIVE.add(batch, outputs["loss"])
        ACTIVE.end_step()


def run(spec: dict[str, Any], recorder: StepRecorder) -> dict[str, Any]:
    from lightning_peft.cli import main

    global ACTIVE
    ACTIVE = recorder
    config = Path(spec["workdir"]) / "run.yaml"
    config.write_text(yaml.safe_dump(fit_config(spec), sort_keys=False))
    try:
        main(["fit", "--config", str(config)])
    except SystemExit as stop:  # click's standalone mode ends with sys.exit, 0 on success
        if stop.code not in (0, None):
            raise RuntimeError(f"lpeft fit exited with {stop.code}") from None
    return {"config": fit_config(spec)}


def fit_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The `lpeft fit` config of this system: lightning-peft's defaults plus the benchmark's shared settings."""
    workdir = Path(spec["workdir"])
    model = {
        "model_name_or_path": spec["model_dir"],
        "quantization": spec["quantization"],
        "adapter": {k: v for k, v in LORA.items() if k != "target_modules"},  # all-linear is the default
        "learning_rate": spec["lr"],
        **spec.get("model_options", {}),
    }
    if spec.get("model_class"):
        model = {"class_path": spec["model_class"], "init_args": model}
    return {
        "seed_everything": spec["seed"],
        "model": model,
        "data": {
            "train_file": spec["train_file"],
            "format": "messages",
            "max_length": spec["max_length"],
            "batch_size": spec["batch_size"],
            "packing": spec["packing"],
            "seed": spec["seed"],
        },
        "trainer": {
            "accelerator": "gpu" if spec["device"] == "cuda" else "cpu",
            "devices": 1,
            "max_epochs": 1,
            "default_root_dir": str(workdir),
            "callbacks": [{"class_path": "benchmarks.harness.lpeft.Recorder"}],
            # The run's precision, as every other system trains in: never the measured CPU choice.
            "precision": "bf16-mixed" if spec["precision"] == "bf16" else "32-true",
            **spec.get("trainer_options", {}),
        },
    }
