"""The `lpeft` command: help, exit codes, one-line errors, cheap start-up."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner
from helpers import write_run_config

from lightning_peft import __version__
from lightning_peft.cli import cli


def run(args, **kwargs):
    return CliRunner().invoke(cli, args, catch_exceptions=False, **kwargs)


def test_help_lists_the_commands():
    result = run(["--help"])
    assert result.exit_code == 0
    for command in ("fit", "validate", "test", "predict"):
        assert f"  {command} " in result.output


def test_version():
    result = run(["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_help_does_not_import_torch():
    code = "import sys; from lightning_peft.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        ("merge", "--overwrite"),
        ("convert", "--overwrite"),
        ("pull", "--allow-base-mismatch"),
        ("inspect", "--allow-base-mismatch"),
        ("generate", "--allow-base-mismatch"),
    ],
)
def test_renamed_flags_are_documented_and_the_old_force_is_hidden(command, flag):
    help_text = run([command, "--help"]).output
    assert f"{flag} " in help_text and "--force" not in help_text


@pytest.mark.parametrize("given", [[], ["--new"], ["--old"], ["--old", "--new"], ["--new", "--old"]])
def test_a_deprecated_spelling_sets_the_new_flag_and_warns_once(given):
    from lightning_peft.cli.flags import flag

    @click.command()
    @flag("--new", "The new spelling.", deprecated="--old")
    def command(new):
        click.echo(f"new={new}")

    result = CliRunner().invoke(command, given)
    assert result.exit_code == 0 and result.stdout == f"new={bool(given)}\n"
    warned = ["lpeft: warning: --old is deprecated; use --new."] if "--old" in given else []
    assert result.stderr.splitlines() == warned


def test_merge_force_still_overwrites_with_a_warning(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import lightning_peft.merging

    calls = []
    monkeypatch.setattr(
        lightning_peft.merging, "merge_adapter", lambda *a, **k: calls.append(k) or SimpleNamespace(output="ok")
    )
    for spelling in ("--overwrite", "--force", None):
        result = run(["merge", str(tmp_path), "--out", str(tmp_path / "out"), *([spelling] if spelling else [])])
        assert result.exit_code == 0, result.output
        deprecated = "lpeft: warning: --force is deprecated; use --overwrite." in result.stderr
        assert deprecated == (spelling == "--force")
    assert [call["force"] for call in calls] == [True, True, False]


def test_python_dash_m_is_the_same_command():
    out = subprocess.run([sys.executable, "-m", "lightning_peft", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "fit" in out.stdout


def test_fit_help_documents_the_model_and_data(capsys):
    from lightning_peft.cli.lightning import run_lightning_cli

    with pytest.raises(SystemExit) as exit_info:
        run_lightning_cli(["fit", "--model.help", "PeftCausalLM"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--model.model_name_or_path" in help_text and "quantization" in help_text


def write_config(tmp_path, tiny_model_dir, **model):
    return write_run_config(tmp_path, tiny_model_dir, model=model)


def lpeft(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lightning_peft", *args], capture_output=True, text=True, cwd=cwd)


def test_fit_runs_and_writes_the_adapter(tmp_path, tiny_model_dir):
    result = lpeft("fit", "--config", str(write_config(tmp_path, tiny_model_dir)))
    assert result.returncode == 0, result.stderr
    # Without a logger too, the run's files go into a folder of its own.
    adapter = tmp_path / "runs" / "lightning_logs" / "version_0" / "adapter"
    assert f"Adapter saved to {adapter}" in result.stderr
    assert (adapter / "adapter_model.safetensors").is_file()
    assert "trainable params" in result.stderr


@pytest.mark.parametrize(
    ("override", "code", "message"),
    [
        (["--model.learning_rate", "-1"], 2, "lpeft: error: `learning_rate`=-1.0 must be > 0."),
        (["--data.train_file", "missing.jsonl"], 3, "lpeft: error: Data file 'missing.jsonl' does not exist"),
        (
            ["--model.adapter", '{"target_modules": ["nope"]}'],
            2,
            "lpeft: error: `adapter.target_modules` ['nope'] match no module",
        ),
    ],
)
def test_errors_are_one_line_with_an_exit_code(tmp_path, tiny_model_dir, override, code, message):
    result = lpeft("fit", "--config", str(write_config(tmp_path, tiny_model_dir)), *override)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "runs").rglob("adapter"))


def test_debug_shows_the_traceback(tmp_path, tiny_model_dir):
    result = lpeft(
        "--debug", "fit", "--config", str(write_config(tmp_path, tiny_model_dir)), "--model.learning_rate", "0"
    )
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_unknown_config_key_is_a_usage_error(tmp_path, tiny_model_dir):
    result = lpeft("fit", "--config", str(write_config(tmp_path, tiny_model_dir)), "--model.learning_rat", "1")
    assert result.returncode == 2
    assert error_line(result) == (
        "lpeft: error: unknown key model.learning_rat (value 1); did you mean model.learning_rate?"
    )


def error_line(result):
    """The one error line of a failed run: no usage block, no jsonargparse detail after or around it.

    Lines before it that are not ours (a third-party package's import-time notice) are tolerated."""
    assert "usage:" not in result.stderr and "Parser key" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("lpeft:")] == lines[-1:], result.stderr
    return lines[-1]


def config_with(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("yaml_text", "override", "expected"),
    [
        (
            "model:\n  lerning_rate: 1\n",
            [],
            "{file}: unknown key model.lerning_rate (value 1); did you mean model.learning_rate?",
        ),
        (
            "model:\n  init_args:\n    lerning_rate: 1\n",
            [],
            "{file}: unknown key model.lerning_rate (value 1); did you mean model.learning_rate?",
        ),
        (
            "trainer:\n  max_stepz: 3\n",
            [],
            "{file}: unknown key trainer.max_stepz (value 3); did you mean trainer.max_steps?",
        ),
        (
            "trainer:\n  max_steps: 1\n",
            ["--data.batchsize", "4"],
            "unknown key data.batchsize (value 4); did you mean data.batch_size?",
        ),
        (
            "model:\n  quantization: 3bit\n",
            [],
            "{file}: model.quantization=3bit is not allowed; choose one of: none, 8bit, 4bit",
        ),
        (
            "trainer:\n  max_steps: 1\n",
            ["--model.quantization", "3bit"],
            "model.quantization=3bit is not allowed; choose one of: none, 8bit, 4bit",
        ),
        (
            "model:\n  gradient_checkpointing: full\n",
            [],
            "{file}: model.gradient_checkpointing=full is not allowed; choose one of: true, false, selective",
        ),
        ("trainer:\n  max_steps: abc\n", [], "{file}: trainer.max_steps=abc is not valid; expected int"),
        ("model:\n  a: [1, 2\ntrainer: {\n", [], "{file}:3:8: invalid YAML: expected ',' or ']', but got ':'"),
    ],
    ids=[
        "yaml-unknown",
        "yaml-init-args-unknown",
        "yaml-trainer-unknown",
        "flag-unknown",
        "yaml-literal",
        "flag-literal",
        "yaml-bool-or-literal",
        "yaml-type",
        "yaml-syntax",
    ],
)
def test_config_parse_errors_are_one_line(tmp_path, yaml_text, override, expected):
    file = config_with(tmp_path, yaml_text)
    result = lpeft("fit", "--config", file, *override)
    assert result.returncode == 2, result.stderr
    assert error_line(result).startswith("lpeft: error: " + expected.format(file=file))


def test_every_unknown_key_is_named_at_once(tmp_path):
    text = "model:\n  lerning_rate: 1\n  foo: 2\ndata:\n  batchsize: 4\ntrainer:\n  max_steps: 1\n  max_stepz: 3\n"
    file = config_with(tmp_path, text)
    result = lpeft("fit", "--config", file, "--trainer.max_epoch", "2", "--data.max_length", "8")
    assert result.returncode == 2, result.stderr
    assert error_line(result) == (
        f"lpeft: error: {file}: unknown key model.lerning_rate (value 1); did you mean model.learning_rate?; also "
        "unknown: model.foo, data.batchsize (did you mean data.batch_size?), trainer.max_epoch (did you mean "
        "trainer.max_epochs?), trainer.max_stepz (did you mean trainer.max_steps?)"
    )


def test_config_parse_errors_keep_the_detail_under_debug(tmp_path):
    result = lpeft("--debug", "fit", "--config", config_with(tmp_path, "model:\n  quantization: 3bit\n"))
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "Expected a typing.Literal" in result.stderr


def test_fit_help_still_prints_the_full_usage():
    result = lpeft("fit", "--help")
    assert result.returncode == 0 and "usage: lpeft" in result.stdout and "--model.help" in result.stdout


def test_the_console_script_imports_user_classes_from_the_current_folder():
    import shutil
    from pathlib import Path

    script = shutil.which("lpeft")
    if script is None:
        pytest.skip("the lpeft console script is not installed (pip install -e .)")
    project = Path(__file__).parents[1] / "examples" / "custom_loss"
    result = subprocess.run(
        [script, "fit", "--model.help", "my_project.model.SmoothedZLossLM"], capture_output=True, text=True, cwd=project
    )
    assert result.returncode == 0, result.stderr
    assert "--model.label_smoothing" in result.stdout


def test_adalora_takes_its_schedule_length_from_max_steps(tmp_path, tiny_model_dir):
    adapter = {"class_path": "peft.AdaLoraConfig", "init_args": {"init_r": 4, "target_r": 2, "tinit": 0, "tfinal": 0}}
    config = str(write_config(tmp_path, tiny_model_dir, adapter=adapter))
    result = lpeft("fit", "--config", config)
    assert result.returncode == 0, result.stderr
    saved = json.loads(
        (tmp_path / "runs" / "lightning_logs" / "version_0" / "adapter" / "adapter_config.json").read_text()
    )
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == 2
    result = lpeft("fit", "--config", config, "--trainer.max_steps", "-1", "--trainer.max_epochs", "1")
    assert result.returncode == 2 and "AdaLoRA needs the number of training steps" in result.stderr


def test_fit_logs_metrics_csv_and_a_run_summary_for_the_model_card(tmp_path, tiny_model_dir):
    config = str(write_config(tmp_path, tiny_model_dir))
    result = lpeft("fit", "--config", config, "--trainer.logger", "true", "--trainer.log_every_n_steps", "1")
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "lightning_logs" / "version_0"
    assert "train_loss" in (run_dir / "metrics.csv").read_text().splitlines()[0]
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["steps"] == 2 and summary["tokens"] > summary["supervised_tokens"] > 0
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_fit_under_ddp_with_two_cpu_processes(tmp_path, tiny_model_dir):
    # DDP starts its second process by re-running the command line: `lpeft` must keep sys.argv intact.
    config = str(write_config(tmp_path, tiny_model_dir))
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    result = lpeft("fit", "--config", config, *ddp)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Adapter saved to") == 1, "one process writes the adapter"
    run_dir = tmp_path / "runs" / "lightning_logs" / "version_0"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "run_summary.json").read_text())["steps"] == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows), rows
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == len(rows), "rank zero alone records the history"
    assert sorted(p.name for p in (tmp_path / "runs" / "lightning_logs").iterdir()) == ["version_0"], "one folder"


def test_adapter_merge_under_ddp_without_a_saved_adapter(tmp_path, tiny_model_dir):
    # trainer.log_dir and the adapter save are collectives: the callback must not call them on rank zero alone.
    config = str(write_config(tmp_path, tiny_model_dir))
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    merge = ["--trainer.callbacks+=lightning_peft.callbacks.AdapterMerge", "--model.save_adapter_on_fit_end", "false"]
    result = lpeft("fit", "--config", config, *ddp, *merge)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "lightning_logs" / "version_0"
    report = json.loads((run_dir / "merged" / "merge_report.json").read_text())
    assert report["passed"] and report["max_abs_logit_diff"] <= 1e-4
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "merged", "metrics.jsonl", "run_summary.json"]


def test_an_unknown_message_role_is_one_line_and_data_roles_maps_it(tmp_path, tiny_model_dir):
    turns = [[{"role": "user", "content": f"Q{i}"}, {"role": "wizard", "content": f"A{i}"}] for i in range(6)]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": t}) + "\n" for t in turns))
    config = str(write_run_config(tmp_path, tiny_model_dir, data={"train_file": str(chat)}))
    result = lpeft("fit", "--config", config)
    assert result.returncode == 3
    assert error_line(result) == (
        "lpeft: error: chat.jsonl line 1: field `messages` item 1: role 'wizard' is not one of system, user, "
        "assistant, tool (ShareGPT's human and gpt included); map it onto one with data.roles, e.g. "
        "{wizard: assistant}."
    )
    mapped = ["--data.roles", "{wizard: assistant}"]
    printed = lpeft("fit", "--config", config, *mapped, "--print_config")
    assert printed.returncode == 0 and "    roles:\n      wizard: assistant\n" in printed.stdout, printed.stdout
    result = lpeft("fit", "--config", config, *mapped)
    assert result.returncode == 0, result.stderr
    bad = lpeft("fit", "--config", config, "--data.roles", "{wizard: ai}")
    assert bad.returncode == 2 and "`roles` maps {'wizard': 'ai'} to no standard role" in error_line(bad)


def test_the_bitsandbytes_kernel_fetch_notice_is_not_shown(caplog, monkeypatch):
    """bitsandbytes' import-time notice that an optional Hub kernel could not be fetched is dropped; its other
    messages are not."""
    import logging

    from lightning_peft.cli.guard import drop_kernel_fetch_notice

    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    monkeypatch.setattr(bnb_logger, "filters", list(bnb_logger.filters))  # undone after the test
    drop_kernel_fetch_notice()
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        bnb_logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "offline")
        bnb_logger.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]
