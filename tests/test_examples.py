"""Every YAML under examples/ goes through the real `lpeft fit` parser and trains 2 steps on the tiny model;
the harness task files in examples/tasks/ are built by lm-evaluation-harness (data read, prompts rendered).

Configs directly in examples/ run from the repository root (their data paths start with `examples/`); a config
in a subfolder is a user project and runs from its own folder, with that folder importable.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
TASKS = sorted((EXAMPLES / "tasks").glob("*.yaml"))  # lm-evaluation-harness task files, for `lpeft eval`
CONFIGS = sorted(set(EXAMPLES.rglob("*.yaml")) - set(TASKS))
CUSTOM_LOSS = EXAMPLES / "custom_loss" / "config.yaml"  # has its own test, with the generic checks too
METHODS = {"lora", "qlora", "dora", "adalora", "ia3", "prefix_tuning", "prompt_tuning", "p_tuning"}


def _id(path: Path) -> str:
    return str(path.relative_to(EXAMPLES))


def _model_section(config: dict) -> tuple[str, dict]:
    """(class path of the LightningModule, its init arguments) as the YAML gives them."""
    model = config["model"]
    if "class_path" in model:
        return model["class_path"], model.get("init_args") or {}
    return "lightning_peft.module.PeftCausalLM", model


def _expected_adapter(init_args: dict) -> tuple[str, dict]:
    """(peft_type, fields the YAML sets) for the `adapter` setting; a plain mapping is LoraConfig."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    adapter = init_args.get("adapter") or {}
    class_name, fields = "LoraConfig", adapter
    if "class_path" in adapter:
        class_name, fields = adapter["class_path"].rpartition(".")[2], adapter.get("init_args") or {}
    peft_types = {cls.__name__: peft_type.value for peft_type, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    return peft_types[class_name], fields


def _fit(config_path: Path, tiny_model_dir: Path, root: Path, monkeypatch) -> object:
    from lightning_peft.cli.lightning import run_lightning_cli

    if config_path.parent == EXAMPLES:
        monkeypatch.chdir(REPO)
    else:
        monkeypatch.chdir(config_path.parent)
        monkeypatch.syspath_prepend(str(config_path.parent))
    return run_lightning_cli(
        [
            "fit",
            "--config",
            str(config_path),
            "--model.init_args.model_name_or_path",
            str(tiny_model_dir),
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.default_root_dir",
            str(root),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            *_keep_adalora_schedule(config_path),
        ]
    )


def _keep_adalora_schedule(config_path: Path) -> list[str]:
    """AdaLoRA's schedule (tinit, tfinal) is sized for the YAML's max_steps, not for this test's 2 steps."""
    config = yaml.safe_load(config_path.read_text())
    adapter = _model_section(config)[1].get("adapter") or {}
    if not str(adapter.get("class_path", "")).endswith("AdaLoraConfig"):
        return []
    return ["--model.init_args.adapter.init_args.total_step", str(config["trainer"]["max_steps"])]


def _check_run(cli, config_path: Path, root: Path) -> None:
    """The run used the YAML's class and adapter, validated, and saved a PEFT adapter of the YAML's type."""
    class_path, init_args = _model_section(yaml.safe_load(config_path.read_text()))
    peft_type, adapter_fields = _expected_adapter(init_args)
    model = cli.model
    assert f"{type(model).__module__}.{type(model).__qualname__}" == class_path
    assert cli.trainer.global_step == 2
    assert "val_loss" in cli.trainer.logged_metrics  # the validation batch ran
    adapter_dir = Path(cli.trainer.log_dir) / "adapter"
    assert adapter_dir.is_relative_to(root)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter_dir.iterdir()}
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == peft_type
    for field, value in adapter_fields.items():
        assert saved[field] == value, field
    if init_args.get("quantization") == "4bit":
        assert any(type(m).__name__ == "Linear4bit" for m in model.model.modules())


def test_every_method_has_an_example():
    assert not METHODS - {path.stem for path in CONFIGS}, "a method's example is missing"
    assert CUSTOM_LOSS in CONFIGS


@pytest.mark.parametrize("config_path", [c for c in CONFIGS if c != CUSTOM_LOSS], ids=_id)
def test_example_trains_and_saves_its_adapter(config_path, tiny_model_dir, tmp_path, monkeypatch):
    cli = _fit(config_path, tiny_model_dir, tmp_path, monkeypatch)
    _check_run(cli, config_path, tmp_path)


def test_custom_loss_project_uses_its_own_loss(tiny_model_dir, tmp_path, monkeypatch):
    cli = _fit(CUSTOM_LOSS, tiny_model_dir, tmp_path, monkeypatch)
    _check_run(cli, CUSTOM_LOSS, tmp_path)

    assert type(cli.model).__name__ == "SmoothedZLossLM"
    assert cli.model.label_smoothing == 0.1
    z_loss = float(cli.trainer.logged_metrics["train_z_loss"])
    assert math.isfinite(z_loss) and z_loss > 0
    # Validation keeps the plain cross-entropy: equal to the base class's loss on the same batch.
    model = cli.model
    batch = next(iter(cli.datamodule.val_dataloader()))
    model.model.eval()
    logits = model(batch).logits[:, -batch["labels"].shape[1] :]
    plain = super(type(model), model).compute_loss(logits, batch["labels"], batch)
    assert model.compute_loss(logits, batch["labels"], batch) == plain
    model.model.train()
    assert model.compute_loss(logits, batch["labels"], batch) > plain  # smoothing + z-loss add to the loss


@pytest.mark.parametrize("task_file", TASKS, ids=_id)
def test_task_files_build_in_the_harness(task_file, monkeypatch, tmp_path):
    pytest.importorskip("lm_eval")
    from lightning_peft.evaluation import resolve_tasks

    monkeypatch.chdir(tmp_path)  # data paths are relative to the task file, not the working folder
    [config] = resolve_tasks([str(task_file)]).specs
    assert config["task"] == task_file.stem
