"""Every Lightning logger with `lpeft fit`: each run's files in a folder of its own, metrics that reach the model
card whatever the loggers, and run summary and metric history that continue across a resume.

W&B runs for real in offline mode and MLflow with a local file store; nothing goes over the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import quiet_trainer, token_batches, write_run_config
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger

from lightning_peft.callbacks import AdapterCheckpoint, MetricHistory, RunSummary
from lightning_peft.errors import DataError
from lightning_peft.hub.runinfo import read_run
from lightning_peft.module import PeftCausalLM
from lightning_peft.run_files import read_history
from lightning_peft.run_folder import run_dir, runs_root

# What every `lpeft fit` run leaves in its folder, whatever the loggers.
RUN_FILES = {"adapter", "checkpoints", "config.yaml", "metrics.jsonl", "run_summary.json"}


def wandb_logger(tmp_path):
    return {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {"save_dir": str(tmp_path / "wandb"), "project": "lpeft-test", "offline": True},
    }


def mlflow_logger(tmp_path):
    return {
        "class_path": "lightning.pytorch.loggers.MLFlowLogger",
        "init_args": {"tracking_uri": f"file:{tmp_path / 'mlruns'}", "experiment_name": "lpeft-test"},
    }


def csv_logger(tmp_path):
    return {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs")}}


def tensorboard_logger(tmp_path):
    return {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(tmp_path / "runs")},
    }


def lpeft_fit(tmp_path, tiny_model_dir, logger, *args, examples=6):
    """`lpeft fit` in a new process (as users run it), 2 steps on a tiny model, with `trainer.logger: logger`;
    a third of the `examples` (rounded up) validates."""
    trainer = {"enable_model_summary": False, "log_every_n_steps": 1, "logger": logger, "enable_checkpointing": None}
    path = write_run_config(tmp_path, tiny_model_dir, trainer=trainer, examples=examples)
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb"),
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "MLFLOW_ALLOW_FILE_STORE": "true",  # MLflow 3.7+ refuses the file store without it
    }
    command = [sys.executable, "-m", "lightning_peft", "fit", "--config", str(path), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_folders(tmp_path):
    return sorted((tmp_path / "runs" / "lightning_logs").iterdir())


def files(folder):
    return {p.name for p in folder.iterdir()}


def train_losses(folder):
    return [row for row in read_history(folder / "metrics.jsonl") if "train_loss" in row]


# ---- each logger, each run its own folder ----------------------------------------------------------------------


@pytest.mark.parametrize("make_logger", [wandb_logger, mlflow_logger], ids=["wandb", "mlflow"])
def test_runs_with_the_same_logger_settings_never_overwrite_each_other(tmp_path, tiny_model_dir, make_logger):
    for _ in range(2):
        result = lpeft_fit(tmp_path, tiny_model_dir, make_logger(tmp_path))
    first, second = run_folders(tmp_path)
    assert (first.name, second.name) == ("version_0", "version_1")
    assert f"Adapter saved to {second / 'adapter'}" in result.stderr
    assert os.listdir(tmp_path / "runs") == ["lightning_logs"], "nothing lands outside the run folders"
    for folder in (first, second):
        assert files(folder) == RUN_FILES
        assert {p.name for p in (folder / "checkpoints").iterdir()} == {"epoch=0-step=2", "last"}
        assert json.loads((folder / "run_summary.json").read_text())["steps"] == 2
        assert [row["step"] for row in train_losses(folder)] == [0, 1]
        assert "val_loss" in read_history(folder / "metrics.jsonl")[-2]
    # The logger itself ran and kept its own files where it keeps them.
    if make_logger is wandb_logger:
        assert len(list((tmp_path / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))) == 2
    else:
        assert len(list((tmp_path / "mlruns").glob("*/*/metrics/train_loss"))) == 2


@pytest.mark.parametrize(
    ("make_logger", "extra"),
    [
        (tensorboard_logger, {"hparams.yaml"}),
        (lambda tmp_path: [wandb_logger(tmp_path), csv_logger(tmp_path)], {"hparams.yaml", "metrics.csv"}),
        (lambda tmp_path: False, set()),
        (lambda tmp_path: True, {"hparams.yaml", "metrics.csv"}),  # the default: CSV, and TensorBoard when installed
    ],
    ids=["tensorboard", "wandb-and-csv", "none", "default"],
)
def test_each_logger_setting_writes_the_run_files_into_one_run_folder(tmp_path, tiny_model_dir, make_logger, extra):
    lpeft_fit(tmp_path, tiny_model_dir, make_logger(tmp_path))
    (folder,) = run_folders(tmp_path)
    events = {name for name in files(folder) if name.startswith("events.out.tfevents.")}
    assert files(folder) - events == RUN_FILES | extra
    tensorboard = make_logger is tensorboard_logger or (make_logger(tmp_path) is True and _tensorboard_installed())
    assert len(events) == (1 if tensorboard else 0), "TensorBoard writes into the run folder, not a second version"
    assert [row["step"] for row in train_losses(folder)] == [0, 1]


def _tensorboard_installed() -> bool:
    import importlib.util

    return bool(importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"))


# ---- resume continues the summary and the history; the card gets them ------------------------------------------


def test_a_resumed_wandb_run_counts_the_whole_run_and_publishes_a_card_with_its_metrics(tmp_path, tiny_model_dir):
    from hub_server import lpeft

    lpeft_fit(tmp_path, tiny_model_dir, wandb_logger(tmp_path))
    lpeft_fit(tmp_path, tiny_model_dir, wandb_logger(tmp_path), "--trainer.max_steps", "4", "--ckpt_path", "last")
    first, resumed = run_folders(tmp_path)
    assert files(resumed) == RUN_FILES
    before = json.loads((first / "run_summary.json").read_text())
    summary = json.loads((resumed / "run_summary.json").read_text())
    # Each part trains one epoch over the same 3 examples: the whole run saw twice the tokens of the first part.
    assert summary["steps"] == 4 and summary["epochs"] == 2
    assert summary["tokens"] == 2 * before["tokens"] and summary["supervised_tokens"] == 2 * before["supervised_tokens"]
    assert summary["duration_s"] > before["duration_s"]
    earlier, history = read_history(first / "metrics.jsonl"), read_history(resumed / "metrics.jsonl")
    assert history[: len(earlier)] == earlier, "the resumed history starts with everything the first part logged"
    assert len(train_losses(resumed)) == 4

    registry = tmp_path / "registry"
    result = lpeft("publish", resumed / "adapter", "acme/resumed", "--registry", registry, "--no-verify")
    assert result.exit_code == 0, result.output
    package = registry / "acme" / "resumed" / "1.0.0"
    card = (package / "README.md").read_text()
    assert "![Training and validation loss](loss_curve.png)" in card
    assert (package / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| Steps | 4 |" in card and f"| Tokens | {summary['tokens']} |" in card
    final_loss = float(f"{train_losses(resumed)[-1]['train_loss']:.6g}")  # as the card's run record rounds it
    assert f"| Final training loss | {final_loss:.4g} |" in card
    assert "`metrics.jsonl`" in card and "not recorded" not in card.split("Hyperparameters")[0]


def test_a_resumed_ddp_run_counts_the_tokens_of_every_process_and_part(tmp_path, tiny_model_dir):
    # 7 examples leave 4 for training: one batch of 2 per process per step, the same tokens every epoch.
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    lpeft_fit(tmp_path, tiny_model_dir, False, *ddp, examples=7)
    lpeft_fit(tmp_path, tiny_model_dir, False, *ddp, "--trainer.max_steps", "4", "--ckpt_path", "last", examples=7)
    first, resumed = run_folders(tmp_path)
    assert files(first) == files(resumed) == RUN_FILES
    before = json.loads((first / "run_summary.json").read_text())
    summary = json.loads((resumed / "run_summary.json").read_text())
    assert summary["steps"] == 4 and summary["tokens"] == 2 * before["tokens"] > 0
    history = read_history(resumed / "metrics.jsonl")
    assert history[: len(read_history(first / "metrics.jsonl"))] == read_history(first / "metrics.jsonl")


def make_module(tiny_model_dir) -> PeftCausalLM:
    return PeftCausalLM(str(tiny_model_dir), adapter={"r": 4}, learning_rate=1e-2)


def fit_in_process(tiny_model_dir, root, max_steps, ckpt_path=None):
    seed_everything(0)
    callbacks = [AdapterCheckpoint(every_n_train_steps=2, save_top_k=-1), RunSummary(), MetricHistory()]
    trainer = quiet_trainer(
        root, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=True, log_every_n_steps=1
    )
    trainer.fit(make_module(tiny_model_dir), train_dataloaders=token_batches(n_batches=8), ckpt_path=ckpt_path)
    return trainer


def test_resuming_an_interrupted_run_logs_each_step_once(tmp_path, tiny_model_dir):
    # A run stopped after step 3 resumes from its step-2 checkpoint: step 3 is trained and logged again, once.
    first = fit_in_process(tiny_model_dir, tmp_path, max_steps=3)
    checkpoint = run_dir(first) / "checkpoints" / "epoch=0-step=2"
    assert [row["step"] for row in train_losses(run_dir(first))] == [0, 1, 2]
    resumed = fit_in_process(tiny_model_dir, tmp_path, max_steps=5, ckpt_path=str(checkpoint))
    assert run_dir(resumed) == tmp_path / "lightning_logs" / "version_1"
    assert files(run_dir(resumed)) == {"adapter", "checkpoints", "metrics.jsonl", "run_summary.json"}
    assert [row["step"] for row in train_losses(run_dir(resumed))] == [0, 1, 2, 3, 4]
    summary = json.loads((run_dir(resumed) / "run_summary.json").read_text())
    assert summary["steps"] == 5 and summary["tokens"] == 5 * 4 * 12, "steps 1-2 of the first part and 3-5"


# ---- the run-folder rule ---------------------------------------------------------------------------------------


def test_the_run_folder_is_a_new_version_without_a_local_logger_and_the_csv_loggers_otherwise(tmp_path):
    folders = [run_dir(quiet_trainer(tmp_path)) for _ in range(2)]
    assert folders == [tmp_path / "lightning_logs" / "version_0", tmp_path / "lightning_logs" / "version_1"]
    assert all(folder.is_dir() for folder in folders)
    assert runs_root(quiet_trainer(tmp_path)) == tmp_path / "lightning_logs"
    trainer = quiet_trainer(tmp_path, logger=CSVLogger(tmp_path / "csv", name="mine"))
    assert run_dir(trainer) == tmp_path / "csv" / "mine" / "version_0" == Path(trainer.log_dir)
    assert run_dir(trainer) is run_dir(trainer), "resolved once per trainer"


@pytest.mark.parametrize("logger", [None, False], ids=["tensorboard-and-csv", "no-logger"])
def test_a_run_that_fails_before_training_leaves_no_run_folder(tmp_path, tiny_model_dir, logger):
    """Lightning makes the loggers' folders before setup; a data error found there must not leave them behind."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q", "completion": "A"}\n{not json\n')
    config = write_run_config(tmp_path, tiny_model_dir, data={"train_file": str(bad)}, trainer={"logger": logger})
    command = [sys.executable, "-m", "lightning_peft", "fit", "--config", str(config)]
    failed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert failed.returncode != 0 and "bad.jsonl" in failed.stderr.strip().splitlines()[-1]
    root = tmp_path / "runs" / "lightning_logs"
    assert not root.exists() or not any(root.iterdir()), sorted(root.rglob("*"))


def test_a_failed_runs_folder_with_anything_else_in_it_is_kept(tmp_path):
    from lightning_peft.run_folder import discard_if_unused

    bare, kept = quiet_trainer(tmp_path / "a"), quiet_trainer(tmp_path / "b")
    for trainer in (bare, kept):
        (run_dir(trainer) / "config.yaml").write_text("model: {}\n")
    (run_dir(kept) / "notes.txt").write_text("mine")
    assert discard_if_unused(bare) == [tmp_path / "a" / "lightning_logs" / "version_0"]
    assert not (tmp_path / "a" / "lightning_logs" / "version_0").exists()
    assert discard_if_unused(kept) == [] and (run_dir(kept) / "notes.txt").is_file()


# ---- reading the history for the card --------------------------------------------------------------------------


def write_run(folder, history, csv=None):
    (folder / "adapter").mkdir(parents=True)
    (folder / "metrics.jsonl").write_text(history)
    if csv is not None:
        (folder / "metrics.csv").write_text(csv)
    return folder / "adapter"


def test_the_card_reads_metrics_jsonl_before_metrics_csv_and_skips_a_cut_last_line(tmp_path):
    history = (
        '{"step":0,"train_loss":2.5,"epoch":0}\n{"step":1,"train_loss":2.0}\n{"step":1,"val_loss":2.25}\n{"step":2,"tr'
    )
    record = read_run(write_run(tmp_path, history, csv="step,train_loss\n0,9.0\n"))
    assert record.train_loss == [(0, 2.5), (1, 2.0)] and record.val_loss == [(1, 2.25)]
    assert record.summary["final_train_loss"] == 2.0 and record.evaluation == {"val_loss": 2.25}
    assert record.sources == ["metrics.jsonl"]


def test_runs_with_only_metrics_csv_still_give_the_card_its_metrics(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "metrics.csv").write_text("epoch,step,train_loss,val_loss\n0,0,3.0,\n0,1,,2.5\n")
    record = read_run(tmp_path / "adapter")
    assert record.train_loss == [(0, 3.0)] and record.val_loss == [(1, 2.5)] and record.sources == ["metrics.csv"]


def test_a_damaged_history_is_an_error_naming_the_line(tmp_path):
    adapter = write_run(tmp_path, '{"step":0,"train_loss":2.5}\nnot json\n{"step":1,"train_loss":2.0}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl line 2 is not JSON .*the file was altered"):
        read_run(adapter)
