"""`lpeft convert`: Axolotl LoRA/QLoRA configs → lightning-peft run configs that `lpeft fit` accepts.

The configs in tests/data/axolotl/ are shaped like Axolotl's own examples (llama-3 qlora / lora-1b /
instruct-lora-8b, mistral qlora-fsdp) and like configs users write (ShareGPT chat data in local files, a config
full of settings without an equivalent). Each is converted, its data pointed at local files and its base at the
tiny test model, and the result goes through the real `lpeft fit` parser; one of them trains two steps.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hub_server import error_line, lpeft

from lightning_peft.errors import ConfigError
from lightning_peft.interop import Conversion, convert_axolotl, convert_axolotl_file, write_run_config
from lightning_peft.interop import axolotl_keys as keys

CONFIGS = Path(__file__).parent / "data" / "axolotl"
NAMES = sorted(p.stem for p in CONFIGS.glob("*.yml"))

# What each config cannot carry over: the claim "names every key it could not carry over", pinned.
DROPPED = {
    "llama3_qlora": {"pad_to_sequence_len", "evals_per_epoch", "special_tokens"},
    "llama3_lora_1b": {
        "pad_to_sequence_len",
        "dataset_prepared_path",
        "loss_watchdog_threshold",
        "loss_watchdog_patience",
        "special_tokens",
    },
    "llama3_instruct_lora_chat": {"pad_to_sequence_len", "eval_max_new_tokens", "special_tokens"},
    "mistral_qlora_fsdp": {
        "dataset_prepared_path",
        "model_config",
        "loss_watchdog_threshold",
        "loss_watchdog_patience",
        "eval_max_new_tokens",
        "fsdp",
        "fsdp_config",
    },
    "sharegpt_local_files": {"eval_sample_packing", "gradient_checkpointing_kwargs"},
    "multi_datasets": set(),
    "unsupported_keys": {
        "lora_target_modules",
        "datasets[0].message_property_mappings",
        "datasets[0].message_property_mappings.tool_calls",
        "datasets[0].roles_to_train",
        "datasets[0].train_on_eos",
        "datasets[0].drop_system_message",
        "val_set_size",
        "optimizer",
        "lr_scheduler",
        "tf32",
        "xformers_attention",
        "num_epochs",
        "loraplus_lr_ratio",
        "dataset_processes",
        "deepspeed",
        "wandb_project",
        "wandb_entity",
        "wandb_name",
        "special_tokens",
        "tokens",
        "hub_model_id",
        "hub_strategy",
        "neftune_noise_alpha",
        "torch_compile",
        "adam_beta2",
        "save_total_limit",
        "resume_from_checkpoint",
        "some_future_axolotl_key",
    },
}


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yml").read_text())


def write_rows(path: Path, entry: dict) -> None:
    """Rows in the shape the data set entry describes (Alpaca, or chat messages under its field names)."""
    if entry.get("type") == "alpaca":
        rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(8)]
    else:
        mapping = entry.get("message_property_mappings") or {}
        role = mapping.get("role", entry.get("message_field_role", "role"))
        content = mapping.get("content", entry.get("message_field_content", "content"))
        user, assistant = ("human", "gpt") if role == "from" else ("user", "assistant")
        rows = [
            {
                entry.get("field_messages", "messages"): [
                    {role: user, content: f"What is {i} + 1?"},
                    {role: assistant, content: f"{i + 1}"},
                ]
            }
            for i in range(8)
        ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def localize(config: dict, tmp_path: Path, base: Path) -> dict:
    """The config with the tiny model as base and every data set in a local file (as a user would run it)."""
    config = copy.deepcopy(config)
    config["base_model"] = str(base)
    for key in ("datasets", "test_datasets"):
        for i, entry in enumerate(config.get(key) or []):
            entry["path"] = str(tmp_path / f"{key}-{i}.jsonl")
            write_rows(Path(entry["path"]), entry)
    return config


def convert_with_cli(config: dict, tmp_path: Path):
    source = tmp_path / "axolotl.yml"
    source.write_text(yaml.safe_dump(config))
    out = tmp_path / "run.yaml"
    result = lpeft("convert", source, "-o", out)
    assert result.exit_code == 0, result.output
    return out, result


def print_config(config_path: Path, capsys) -> dict:
    """What `lpeft fit --config FILE --print_config` resolves (the real parser, nothing instantiated)."""
    from lightning_peft.cli.lightning import run_lightning_cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_lightning_cli(["fit", "--config", str(config_path), "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("name", NAMES)
def test_each_config_is_accepted_by_lpeft_fit(name, tmp_path, tiny_model_dir, capsys):
    local = localize(load(name), tmp_path, tiny_model_dir)
    out, _ = convert_with_cli(local, tmp_path)
    conversion = convert_axolotl(local)
    resolved = print_config(out, capsys)
    for section in ("model", "data"):
        for key, value in conversion.config[section].items():
            assert resolved[section]["init_args"][key] == value, (section, key)
    for key, value in conversion.config["trainer"].items():
        if key == "callbacks":
            assert [c["class_path"] for c in resolved["trainer"]["callbacks"]] == [c["class_path"] for c in value]
        else:
            assert resolved["trainer"][key] == value, key
    if "seed_everything" in conversion.config:
        assert resolved["seed_everything"] == conversion.config["seed_everything"]


@pytest.mark.parametrize("name", NAMES)
def test_every_key_is_carried_or_named_with_a_reason(name, tmp_path):
    source = load(name)
    conversion = convert_axolotl_file(CONFIGS / f"{name}.yml")
    assert {d.key for d in conversion.dropped} == DROPPED[name]
    set_keys = {k for k, v in source.items() if v not in (None, "", [], {})}
    dropped_whole = {d.key for d in conversion.dropped}
    # No key vanishes: each was read by a conversion step, or is named, or only steers Axolotl itself.
    assert set_keys <= set(conversion.carried) | dropped_whole | keys.AXOLOTL_ONLY
    assert not set(conversion.carried) & dropped_whole
    assert all(d.reason and "\n" not in d.line() for d in conversion.dropped)
    # The header of the written file and the warnings name each one.
    out = tmp_path / "run.yaml"
    result = lpeft("convert", CONFIGS / f"{name}.yml", "-o", out)
    assert result.exit_code == 0, result.output
    header = [line for line in out.read_text().splitlines() if line.startswith("#")]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("lpeft: warning: ")]
    for dropped in conversion.dropped:
        assert f"#   {dropped.line()}" in header
        assert f"lpeft: warning: not carried over: {dropped.line()}" in warnings
    assert f"{len(conversion.dropped)} not (listed at its top)" in result.stdout


def test_the_qlora_example_keeps_axolotls_meaning():
    config = convert_axolotl_file(CONFIGS / "llama3_qlora.yml").config
    assert config["model"] == {
        "model_name_or_path": "NousResearch/Meta-Llama-3-8B",
        "quantization": "4bit",
        "adapter": {"r": 32, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"},
        "learning_rate": 0.0002,
        "optimizer": "paged_adamw",  # paged_adamw_32bit
        "warmup_steps": 10,
        "gradient_checkpointing": True,
        "attn_implementation": "flash_attention_2",
    }
    assert config["data"] == {
        "train_file": "tatsu-lab/alpaca",
        "format": "alpaca",
        "batch_size": 2,
        "max_length": 4096,
        "packing": True,
        "group_by_length": False,
    }
    # Axolotl (transformers) clips gradients at 1.0 by default; Lightning only when told.
    assert config["trainer"] == {
        "accumulate_grad_batches": 4,
        "gradient_clip_val": 1.0,
        "max_epochs": 4,
        "default_root_dir": "./outputs/qlora-out",
        "log_every_n_steps": 1,
    }


def test_conversion_is_a_frozen_result_with_named_fields():
    conversion = convert_axolotl_file(CONFIGS / "llama3_qlora.yml")
    assert isinstance(conversion, Conversion)
    assert {f.name for f in dataclasses.fields(conversion)} == {"config", "dropped", "notes", "carried"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        conversion.config = {}  # type: ignore[misc]


def test_hub_data_sets_are_carried_and_flagged():
    conversion = convert_axolotl_file(CONFIGS / "llama3_qlora.yml")
    (note,) = [n for n in conversion.notes if n.startswith("datasets[0].path")]
    assert "'tatsu-lab/alpaca' is not a local file, so it is loaded from the Hugging Face Hub" in note
    assert "offline (HF_HUB_OFFLINE=1) it must be in the `datasets` cache" in note
    local = convert_axolotl_file(CONFIGS / "unsupported_keys.yml")  # ./data/chat.jsonl: a file name, no note
    assert not [n for n in local.notes if n.startswith("datasets[0].path")]


def test_several_data_sets_become_train_datasets_each_with_its_format(capsys, tmp_path):
    conversion = convert_axolotl_file(CONFIGS / "multi_datasets.yml")
    assert conversion.config["data"]["train_datasets"] == [
        {
            "path": "HuggingFaceH4/ultrachat_200k",
            "name": "default",
            "revision": "main",
            "split": "train_sft",
            "format": "messages",
        },
        {"path": "data/alpaca.jsonl", "format": "alpaca"},
        {"path": "acme/stories", "format": "text", "columns": {"text": "story"}},
    ]
    assert "train_file" not in conversion.config["data"] and "format" not in conversion.config["data"]
    assert conversion.config["data"]["val_fraction"] == 0.05 and not conversion.dropped
    out, _ = convert_with_cli(load("multi_datasets"), tmp_path)
    resolved = print_config(out, capsys)["data"]["init_args"]
    assert resolved["train_datasets"] == conversion.config["data"]["train_datasets"]


@pytest.mark.parametrize(
    ("entry", "data", "reason_key"),
    [
        ({"path": "org/chat", "split": "train"}, {"train_file": "org/chat"}, None),  # Axolotl's default split
        ({"path": "org/chat", "split": "dev"}, {"train_file": {"path": "org/chat", "split": "dev"}}, None),
        (
            {"path": "hf://datasets/org/chat", "name": "a"},
            {"train_file": {"path": "hf://datasets/org/chat", "name": "a"}},
            None,
        ),
        ({"path": "chat.jsonl", "name": "a"}, {"train_file": "chat.jsonl"}, "datasets[0].name"),
        ({"path": "chat.jsonl", "revision": "v1"}, {"train_file": "chat.jsonl"}, "datasets[0].revision"),
    ],
)
def test_hub_subsets_splits_and_revisions(entry, data, reason_key):
    conversion = convert_axolotl(base(datasets=[entry]))
    assert {k: conversion.config["data"].get(k) for k in data} == data
    assert set(dropped(conversion)) == ({reason_key} if reason_key else set())


def test_a_hub_validation_set_reads_axolotls_default_split():
    conversion = convert_axolotl(base(datasets=[{"path": "a.jsonl"}], test_datasets=[{"path": "org/chat"}]))
    assert conversion.config["data"]["val_file"] == {"path": "org/chat", "split": "test"}


def test_sharegpt_chat_data_and_step_schedules(tmp_path):
    config = convert_axolotl_file(CONFIGS / "sharegpt_local_files.yml").config
    assert config["seed_everything"] == 1234 and config["data"]["seed"] == 1234
    assert config["data"]["format"] == "messages" and config["data"]["columns"] == {"messages": "conversations"}
    assert config["data"]["val_file"] == "data/sharegpt_val.jsonl" and "val_fraction" not in config["data"]
    assert config["model"]["lr_scheduler"] == "constant" and config["model"]["warmup_ratio"] == 0.05
    assert config["model"]["quantization_options"] == {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    trainer = config["trainer"]
    # eval_steps counts optimizer steps, Lightning's val_check_interval training batches: 50 x 2 accumulated.
    assert trainer["val_check_interval"] == 100 and trainer["check_val_every_n_epoch"] is None
    assert trainer["max_steps"] == 500 and "max_epochs" not in trainer  # max_steps wins, as in transformers
    assert trainer["gradient_clip_val"] == 0.3 and trainer["precision"] == "32-true"
    assert trainer["callbacks"][0]["init_args"] == {"monitor": "val_loss", "mode": "min", "patience": 3}
    assert trainer["callbacks"][1]["init_args"] == {"every_n_train_steps": 100, "save_top_k": -1}


def base(**settings):
    return {"base_model": "org/model", "adapter": "lora", **settings}


def dropped(conversion) -> dict:
    return {d.key: d.reason for d in conversion.dropped}


def test_defaults_that_differ_are_written_out():
    conversion = convert_axolotl(base())
    config = conversion.config
    assert config["data"] == {"batch_size": 1, "group_by_length": False}  # Axolotl's micro batch 1, no grouping
    assert config["trainer"] == {"gradient_clip_val": 1.0, "max_epochs": 1}
    assert config["model"]["warmup_ratio"] == 0.03  # 3% warmup (Axolotl caps it at 100 steps: noted)
    assert any("at most 100" in n for n in conversion.notes)
    assert any("neither lora_target_modules nor lora_target_linear" in n for n in conversion.notes)
    assert any("no `datasets`" in n for n in conversion.notes)


@pytest.mark.parametrize(
    ("settings", "model"),
    [
        ({"adapter": "qlora", "load_in_4bit": True}, {"quantization": "4bit"}),
        ({"load_in_8bit": True}, {"quantization": "8bit"}),
        ({"peft": {"backend": "bnb", "weight_dtype": "nf4"}}, {"quantization": "4bit"}),
        ({"learning_rate": "2e-4"}, {"learning_rate": 2e-4}),  # YAML 1.1 reads 2e-4 as a string
        ({"lr_scheduler": "linear", "warmup_steps": 5}, {"lr_scheduler": "linear", "warmup_steps": 5}),
        ({"optimizer": "adamw_torch_fused", "warmup_steps": 0}, {"warmup_steps": 0}),
        (
            {"lora_target_linear": True, "lora_target_modules": ["q_proj"]},
            {"adapter": {"target_modules": "all-linear"}},
        ),
        ({"lora_r": 4, "peft_use_dora": True, "lora_fan_in_fan_out": False}, {"adapter": {"r": 4, "use_dora": True}}),
        (
            {"lora_model_dir": "runs/a/adapter", "warmup_steps": 0},
            {"adapter_path": "runs/a/adapter", "warmup_steps": 0},
        ),
        ({"sdp_attention": True, "warmup_steps": 0}, {"attn_implementation": "sdpa", "warmup_steps": 0}),
        ({"attention": "flash", "warmup_steps": 0}, {"attn_implementation": "flash_attention_2", "warmup_steps": 0}),
        (
            {"trust_remote_code": True, "revision_of_model": "main", "warmup_steps": 0},
            {"trust_remote_code": True, "revision": "main", "warmup_steps": 0},
        ),
    ],
)
def test_model_settings(settings, model):
    converted = convert_axolotl(base(**settings)).config["model"]
    for key, value in model.items():
        if isinstance(value, dict):
            assert {k: converted[key][k] for k in value} == value
        else:
            assert converted[key] == value


def test_what_cannot_be_carried_is_named():
    conversion = convert_axolotl(
        base(
            lora_model_dir="runs/a/adapter",
            lora_r=8,
            lr_scheduler="constant",
            warmup_steps=10,
            eval_steps=0.1,
            val_set_size=0.1,
            gradient_checkpointing="offload",
            num_epochs=0.5,
        )
    )
    reasons = dropped(conversion)
    assert "adapter_config.json defines the adapter" in reasons["lora_r"]
    assert "adapter" not in conversion.config["model"]  # adapter and adapter_path together are refused by fit
    assert "constant ignores warmup" in reasons["warmup_steps"]
    assert "a fraction of all steps" in reasons["eval_steps"]
    assert "activation offloading" in reasons["gradient_checkpointing"]
    assert conversion.config["model"]["gradient_checkpointing"] is True
    assert conversion.config["trainer"]["max_epochs"] == 1 and "whole epochs" in reasons["num_epochs"]


@pytest.mark.parametrize(
    ("entry", "columns", "reason_key"),
    [
        (
            {"field_messages": "conversations", "message_property_mappings": {"role": "from", "content": "value"}},
            {"messages": "conversations"},
            None,
        ),
        ({"message_field_role": "role", "message_field_content": "content", "roles": {"user": ["user"]}}, None, None),
        (
            {
                "message_property_mappings": {"role": "from", "content": "value"},
                "roles": {"user": ["human"], "assistant": ["gpt"]},
            },
            None,
            None,
        ),
        ({"roles": {"user": ["human"], "assistant": ["gpt"]}}, None, None),  # understood in role/content data too
        (
            {"message_property_mappings": {"role": "speaker", "content": "text"}},
            None,
            "datasets[0].message_property_mappings",
        ),
        ({"roles_to_train": ["assistant"], "train_on_eos": "turn", "chat_template": "tokenizer_default"}, None, None),
        ({"roles_to_train": ["user", "assistant"]}, None, "datasets[0].roles_to_train"),
        ({"train_on_eos": "last"}, None, "datasets[0].train_on_eos"),
        ({"chat_template": "mistral_v1"}, None, "datasets[0].chat_template"),
    ],
)
def test_chat_template_data_sets(entry, columns, reason_key):
    """Axolotl's chat_template keys; `roles` that only restate the names understood anyway give no data.roles."""
    conversion = convert_axolotl(base(datasets=[{"path": "chat.jsonl", "type": "chat_template", **entry}]))
    data = conversion.config["data"]
    assert data["format"] == "messages" and data.get("columns") == columns and "roles" not in data
    assert set(dropped(conversion)) == ({reason_key} if reason_key else set())


@pytest.mark.parametrize(
    ("roles", "expected", "reason_key"),
    [
        ({"assistant": ["gpt", "bot"], "user": ["human", "person"]}, {"bot": "assistant", "person": "user"}, None),
        ({"assistant": ["wizard"], "system": None}, {"wizard": "assistant"}, None),
        ({"narrator": ["n"]}, None, "datasets[0].roles"),
        ({"assistant": "bot"}, None, "datasets[0].roles"),
    ],
)
def test_chat_roles_become_data_roles(roles, expected, reason_key, tmp_path):
    entry = {"path": "chat.jsonl", "type": "chat_template", "roles": roles}
    conversion = convert_axolotl(base(datasets=[entry]))
    assert conversion.config["data"].get("roles") == expected
    assert set(dropped(conversion)) == ({reason_key} if reason_key else set())
    mixture = convert_axolotl(base(datasets=[entry, {"path": "b.jsonl", "type": "alpaca"}]))
    first, second = mixture.config["data"]["train_datasets"]
    assert first.get("roles") == expected and "roles" not in second


@pytest.mark.parametrize(
    ("entry", "data", "reason_key"),
    [
        (
            {"path": "x.jsonl", "type": "completion", "field": "body"},
            {"format": "text", "columns": {"text": "body"}},
            None,
        ),
        (
            {"path": "json", "data_files": ["a.jsonl", "b.jsonl"], "type": "alpaca"},
            {"train_file": "a.jsonl"},
            "datasets[0].data_files",
        ),
        ({"path": "x.parquet", "type": "alpaca_chat.load_qa"}, {"train_file": "x.parquet"}, "datasets[0].type"),
        ({"path": "x.csv", "type": "alpaca", "split": "test"}, {"format": "alpaca"}, "datasets[0].split"),
        (
            {"path": "x.jsonl", "type": {"field_instruction": "q", "format": "{instruction}"}},
            {"train_file": "x.jsonl"},
            "datasets[0].type",
        ),
    ],
)
def test_other_data_sets(entry, data, reason_key):
    conversion = convert_axolotl(base(datasets=[entry]))
    assert {k: conversion.config["data"].get(k) for k in data} == data
    assert set(dropped(conversion)) == ({reason_key} if reason_key else set())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"base_model": None}, "`base_model` is missing"),
        ({"adapter": None}, "`adapter` is not set, which makes it an Axolotl full fine-tune"),
        ({"adapter": "llama-adapter"}, "`adapter`='llama-adapter' is not an adapter type"),
        ({"load_in_4bit": True, "load_in_8bit": True}, "are both true"),
        ({"adapter": "qlora", "load_in_8bit": True}, "QLoRA loads the base in 4-bit"),
        ({"datasets": "tatsu-lab/alpaca"}, "`datasets` must be a list"),
        ({"datasets": [{"type": "alpaca"}]}, "`datasets[0]` has neither `path` nor `data_files`"),
        ({"micro_batch_size": "two"}, "`micro_batch_size`='two' is not a number"),
    ],
)
def test_configs_that_cannot_be_converted(settings, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        convert_axolotl(base(**settings))


def test_cli_errors_are_one_line_and_write_nothing(tmp_path):
    cases = {
        "bad.yml": ("a: [1, 2\n", "bad.yml is not valid YAML (line 2"),
        "list.yml": ("- base_model: x\n", "list.yml is a list, not a mapping of Axolotl settings"),
        "empty.yml": ("", "empty.yml is empty, not a mapping"),
        "nobase.yml": ("adapter: lora\n", "nobase.yml: `base_model` is missing"),
        "ia3.yml": ("base_model: x/y\nadapter: ia3\n", "ia3.yml: `adapter`='ia3' is not an adapter type"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        result = lpeft("convert", tmp_path / name, "-o", tmp_path / f"{name}.out.yaml")
        assert result.exit_code == 2 and message in error_line(result), (name, result.output)
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / f"{name}.out.yaml").exists()
    assert lpeft("convert", tmp_path / "absent.yml").exit_code == 2  # click: the file must exist


def test_an_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "run.yaml"
    out.write_text("mine\n")
    result = lpeft("convert", CONFIGS / "llama3_qlora.yml", "-o", out)
    assert result.exit_code == 2 and f"`-o` {out} exists; choose another file or pass --overwrite" in error_line(result)
    assert out.read_text() == "mine\n"
    result = lpeft("convert", CONFIGS / "llama3_qlora.yml", "-o", out, "--overwrite")
    assert result.exit_code == 0 and out.read_text().startswith("# Converted from llama3_qlora.yml")
    assert "deprecated" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]  # no staging file left behind


def test_the_old_force_spelling_still_overwrites_and_warns(tmp_path):
    out = tmp_path / "run.yaml"
    out.write_text("mine\n")
    result = lpeft("convert", CONFIGS / "llama3_qlora.yml", "-o", out, "--force")
    assert result.exit_code == 0 and out.read_text().startswith("# Converted from llama3_qlora.yml")
    deprecations = [line for line in result.stderr.splitlines() if "deprecated" in line]
    assert deprecations == ["lpeft: warning: --force is deprecated; use --overwrite."]
    assert "--force" not in lpeft("convert", "--help").stdout
    with pytest.warns(DeprecationWarning, match="`force` is deprecated; use `overwrite`"):
        write_run_config("a: 1\n", out, force=True)
    assert out.read_text() == "a: 1\n"


def test_without_output_the_config_goes_to_stdout_and_warnings_to_stderr():
    result = lpeft("convert", CONFIGS / "llama3_qlora.yml")
    assert result.exit_code == 0
    assert yaml.safe_load(result.stdout) == convert_axolotl_file(CONFIGS / "llama3_qlora.yml").config
    assert "lpeft: warning: not carried over: special_tokens=" in result.stderr


def test_the_mirrored_settings_match_lightning_peft():
    import typing

    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from lightning_peft.data import formats, readers
    from lightning_peft.module import AttnImplementation, Optimizer, Scheduler

    assert keys.DATA_SUFFIXES == readers.SUFFIXES
    assert keys.SHAREGPT_ROLES == formats.SHAREGPT_ROLES and keys.ROLES == formats.ROLES
    assert typing.get_args(AttnImplementation) == keys.ATTENTION
    assert set(keys.OPTIMIZERS.values()) <= set(typing.get_args(Optimizer))
    assert set(keys.SCHEDULERS.values()) <= set(typing.get_args(Scheduler))
    assert set(keys.LORA_FIELDS.values()) <= set(LoraConfig.__dataclass_fields__)
    import inspect

    assert set(inspect.signature(BitsAndBytesConfig).parameters) >= keys.BNB_OPTIONS


def test_converting_imports_no_torch(tmp_path):
    code = (
        "import sys\nfrom lightning_peft.cli import main\n"
        f"try: main(['convert', {str(CONFIGS / 'llama3_qlora.yml')!r}, '-o', {str(tmp_path / 'run.yaml')!r}])\n"
        "except SystemExit as e: assert e.code in (0, None), e.code\nprint('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_a_converted_config_trains_two_steps(tmp_path, tiny_model_dir, monkeypatch):
    """QLoRA + DoRA on ShareGPT chat data, validated and checkpointed: the converted run, shortened."""
    from lightning_peft.cli.lightning import run_lightning_cli

    monkeypatch.chdir(tmp_path)
    out, _ = convert_with_cli(localize(load("sharegpt_local_files"), tmp_path, tiny_model_dir), tmp_path)
    cli = run_lightning_cli(
        [
            "fit",
            "--config",
            str(out),
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "2",  # validate once (the early-stopping callback watches val_loss)
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--data.num_workers",
            "0",
        ]
    )
    trainer = cli.trainer
    assert trainer.global_step == 2 and "val_loss" in trainer.callback_metrics
    assert Path(trainer.log_dir).resolve().parent.parent == (tmp_path / "outputs" / "tinyllama-chat").resolve()
    saved = json.loads((Path(trainer.log_dir) / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["use_dora"]) == (8, 16, True)
    assert sorted(saved["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert cli.model.hparams.quantization == "4bit" and cli.datamodule.packing


AXOLOTL_TEMPLATES_DIR = CONFIGS / "templates"
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"},
    ],
    [{"role": "user", "content": "only a question"}],
]


@pytest.mark.parametrize("name", sorted(keys.AXOLOTL_TEMPLATES))
def test_mapped_axolotl_templates_render_like_the_builtins(name):
    """Every conversation Axolotl's template accepts renders to the same text with the built-in it maps to."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from lightning_peft.data.chat_templates import BUILTIN

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def refuse(message):
        raise ValueError(message)

    env.globals["raise_exception"] = refuse
    theirs = env.from_string((AXOLOTL_TEMPLATES_DIR / f"{name}.jinja").read_text())
    ours = env.from_string(BUILTIN[keys.AXOLOTL_TEMPLATES[name]].source)
    compared = 0
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            values = {"messages": messages, "bos_token": "<s>", "eos_token": "</s>", "add_generation_prompt": prompt}
            try:
                expected = theirs.render(**values)
            except ValueError:
                continue  # Axolotl's refuses it (Gemma: no system role); ours may accept more
            assert ours.render(**values) == expected, (name, messages, prompt)
            compared += 1
    assert compared >= 4


@pytest.mark.parametrize(
    ("settings", "template", "dropped_key", "note"),
    [
        ({"chat_template": "llama3"}, "llama3", None, None),
        ({"chat_template": "jinja", "chat_template_jinja": "{{ messages }}"}, "{{ messages }}", None, None),
        ({"chat_template": "jinja"}, None, "chat_template", None),
        ({"chat_template": "tokenizer_default_fallback_chatml"}, None, None, "data.chat_template: chatml"),
        ({"chat_template": "qwen_25"}, None, "chat_template", None),
    ],
)
def test_chat_template_names_carry_over(settings, template, dropped_key, note):
    conversion = convert_axolotl(base(**settings))
    assert conversion.config["data"].get("chat_template") == template
    assert set(dropped(conversion)) == ({dropped_key} if dropped_key else set())
    if dropped_key == "chat_template" and settings["chat_template"] != "jinja":
        assert "templates/qwen_25.jinja and set data.chat_template to its path" in dropped(conversion)[dropped_key]
    if note:
        assert any(note in line for line in conversion.notes)


def test_one_chat_template_per_run():
    entry = {"path": "chat.jsonl", "type": "chat_template", "chat_template": "gemma"}
    conversion = convert_axolotl(base(chat_template="chatml", datasets=[entry]))
    assert conversion.config["data"]["chat_template"] == "gemma"  # the data set's own, as Axolotl renders it
    assert "one chat template per run" in dropped(conversion)["chat_template"]
