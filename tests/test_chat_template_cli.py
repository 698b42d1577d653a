"""End to end: `lpeft fit` with `data.chat_template: chatml` on a base whose tokenizer has no template and no
ChatML tokens, then the adapter in plain PEFT, `lpeft generate --chat` and `lpeft predict`.

One `lpeft fit` run (a subprocess, as users run it) is shared by the tests of this module.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny import save_tiny_model

from lightning_peft.data.chat_templates import BUILTIN

BASE_VOCAB = 259  # the base byte tokenizer: <unk>, <s>, </s> and 256 bytes
NEW_IDS = [259, 260]  # <|im_start|>, <|im_end|>


def lpeft(*args):
    return subprocess.run([sys.executable, "-m", "lightning_peft", *map(str, args)], capture_output=True, text=True)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny Llama with a base model's tokenizer: no chat template, no ChatML tokens."""
    return save_tiny_model(tmp_path_factory.mktemp("base"), chat=False)


def write_fit_config(root, base, **data):
    rows = [
        {"messages": [{"role": "user", "content": f"say {c}"}, {"role": "assistant", "content": c * 4}]}
        for c in "abcdefgh"
    ]
    config = {
        "model": {
            "model_name_or_path": str(base),
            "adapter": {"r": 4},
            "learning_rate": 0.05,
            "adapter_dir": str(root / "adapter"),
        },
        "data": {"train_file": write_jsonl(root / "train.jsonl", rows), "batch_size": 4, **data},
        "trainer": {
            "max_steps": 4,
            "default_root_dir": str(root / "runs"),
            "enable_progress_bar": False,
            "logger": False,
            "enable_checkpointing": False,
        },
    }
    (root / "run.yaml").write_text(json.dumps(config))  # JSON is YAML
    return root / "run.yaml"


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    """(base folder, adapter folder, the fit's stderr) of one `lpeft fit` with chatml on a template-less base."""
    root = tmp_path_factory.mktemp("chatml-fit")
    result = lpeft("fit", "--config", write_fit_config(root, base, chat_template="chatml"))
    assert result.returncode == 0, result.stderr
    return base, root / "adapter", result.stderr


@pytest.mark.parametrize(
    ("chat_template", "message"),
    [
        ({}, "renders conversations with a chat template, but the tokenizer"),
        ({"chat_template": "chatlm"}, "`data.chat_template`='chatlm' is not a built-in template (chatml, gemma"),
        ({"chat_template": "my.jinja"}, "`data.chat_template`='my.jinja': the file does not exist; give the path"),
    ],
)
def test_fit_errors_are_one_line_before_training(base, tmp_path, chat_template, message):
    result = lpeft("fit", "--config", write_fit_config(tmp_path, base, **chat_template))
    assert result.returncode == 2, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("lpeft: error:")]
    assert message in line and "data.chat_template" in line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "adapter").exists()


def test_fit_help_documents_the_setting(capsys):
    from lightning_peft.cli.lightning import run_lightning_cli

    with pytest.raises(SystemExit) as exit_info:
        run_lightning_cli(["fit", "--data.help", "SFTDataModule"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--data.chat_template" in text and "a built-in name (chatml, gemma, llama3, mistral, phi3, qwen2)" in text


def plain_peft(base, adapter):
    """The adapter loaded the documented way: base, grown to the saved tokenizer's size, then PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tokenizer))
    return PeftModel.from_pretrained(model, str(adapter)).eval(), tokenizer


def test_fit_trains_the_new_rows_only(run):
    _, adapter, stderr = run
    assert "training the embedding rows of the new tokens [259, 260] only" in stderr
    saved = load_file(adapter / "adapter_model.safetensors")
    deltas = {k: v for k, v in saved.items() if "trainable_tokens_delta" in k}
    assert set(deltas) == {
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta",  # the tiny Llama's lm_head is untied
    }
    assert all(v.shape[0] == len(NEW_IDS) for v in deltas.values())
    assert all("lora_" in k for k in set(saved) - set(deltas))  # nothing of the base's matrices
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"model.embed_tokens": NEW_IDS, "lm_head": NEW_IDS}


def test_plain_peft_loads_it_with_the_base_rows_unchanged(run):
    from transformers import AutoModelForCausalLM

    base, adapter, _ = run
    model, tokenizer = plain_peft(base, adapter)
    assert len(tokenizer) == BASE_VOCAB + 2 and tokenizer.chat_template == BUILTIN["chatml"].source
    original = AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().weight
    delta = load_file(adapter / "adapter_model.safetensors")[
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    ]
    with torch.no_grad():
        rows = model.get_input_embeddings()(torch.arange(BASE_VOCAB + 2))
    # Lookups copy rows: the old ones are exactly the base's, the new ones exactly the trained values.
    assert torch.equal(rows[:BASE_VOCAB], original)
    assert torch.equal(rows[BASE_VOCAB:], delta)


def test_generate_renders_with_the_adapters_template(run):
    base, adapter, _ = run
    result = lpeft(
        "generate", "--model", base, "--adapter", adapter, "--prompt", "say b", "--chat", "--max-new-tokens", 6
    )
    assert result.returncode == 0, result.stderr
    model, tokenizer = plain_peft(base, adapter)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "say b"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nsay b<|im_end|>\n<|im_start|>assistant\n"
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    assert result.stdout.strip() == expected.strip()
    # The base alone has no template: asking it for a chat answer is still a one-line error.
    result = lpeft("generate", "--model", base, "--prompt", "x", "--chat")
    assert result.returncode == 2 and "has no chat template" in result.stderr


def test_predict_renders_prompts_with_the_adapters_template(run, tmp_path):
    base, adapter, _ = run
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"messages": [{"role": "user", "content": "say c"}, {"role": "assistant", "content": "cccc"}]}],
    )
    out = tmp_path / "predictions.jsonl"
    config = {
        "model": {"model_name_or_path": str(base), "adapter_path": str(adapter)},
        "data": {"predict_file": prompts},
        "trainer": {"default_root_dir": str(tmp_path), "enable_progress_bar": False, "logger": False},
    }
    (tmp_path / "predict.yaml").write_text(json.dumps(config))
    result = lpeft(
        "predict", "--config", tmp_path / "predict.yaml",
        "--trainer.callbacks+=lightning_peft.callbacks.PredictionWriter",
        "--trainer.callbacks.init_args.output_file", out, "--trainer.callbacks.init_args.max_new_tokens", 3,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["prompt"] == "<|im_start|>user\nsay c<|im_end|>\n<|im_start|>assistant\n"
    assert row["reference"] == "cccc"
