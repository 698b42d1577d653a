"""`lpeft generate`: one batch across adapters, answers side by side, streaming, prompt files and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from hub_server import error_line, lpeft, make_adapter

from lightning_peft.cli.generate import _print_block
from lightning_peft.serving import AdapterServer


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    return make_adapter(root / "one", tiny_model_dir, seed=1), make_adapter(root / "two", tiny_model_dir, seed=2)


def alone(base, folders, prompt, name, **settings):
    """The answer of one adapter to one prompt, generated on its own (a batch of one row)."""
    server = AdapterServer(str(base))
    if name != "base":
        server.load(name, folders[name])
    return server.generate([prompt], name, **settings)[0]


def test_block_layout(capsys):
    _print_block("Capital of Peru?", {"capitals": '{"capital": "Lima"}', "base": "Lima.\nIt is in Peru.\n"})
    _print_block(None, {"only": "  just the answer \n"})
    assert capsys.readouterr().out.splitlines() == [
        "> Capital of Peru?",
        '[capitals] {"capital": "Lima"}',
        "[base]     Lima.",
        "           It is in Peru.",
        "",
        "just the answer",
    ]


def test_several_adapters_answer_side_by_side(tiny_model_dir, two_adapters):
    one, two = two_adapters
    prompts = ["hello there", "a"]
    result = lpeft(
        "generate", "--model", tiny_model_dir, "--adapter", one, "--adapter", f"second={two}", "--with-base",
        "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", "6",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    folders = {"one": one, "second": two}
    expected = []
    for prompt in prompts:
        answers = {n: alone(tiny_model_dir, folders, prompt, n, max_new_tokens=6) for n in ("one", "second", "base")}
        assert len(set(answers.values())) == 3  # the adapters really differ
        width = len("[second]") + 1
        expected.append(f"> {prompt}")
        for name, answer in answers.items():
            lines = answer.strip().splitlines() or [""]
            expected += [f"[{name}]".ljust(width) + lines[0], *(" " * width + line for line in lines[1:])]
        expected.append("")
    assert result.stdout.splitlines() == expected


def test_stream_one_adapter_with_chat(tiny_model_dir, two_adapters):
    one, _ = two_adapters
    result = lpeft(
        "generate", "--model", tiny_model_dir, "--adapter", f"one={one}", "--prompt", "hi", "--chat", "--stream",
        "--max-new-tokens", "8",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == alone(tiny_model_dir, {"one": one}, "hi", "one", chat=True, max_new_tokens=8) + "\n"


def test_sampling_is_seeded(tiny_model_dir, two_adapters):
    one, two = two_adapters
    args = ["generate", "--model", tiny_model_dir, "--adapter", one, "--adapter", two, "--prompt", "hi"]
    args += ["--temperature", "1.0", "--max-new-tokens", "12"]
    runs = [lpeft(*args, "--seed", seed) for seed in (3, 3, 4)]
    assert all(run.exit_code == 0 for run in runs), runs[0].output
    assert runs[0].stdout == runs[1].stdout != runs[2].stdout


def test_prompts_files(tiny_model_dir, tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "first"}) + "\n" + json.dumps({"prompt": "second"}) + "\n")
    outputs = []
    for name in ("p.txt", "p.jsonl"):
        result = lpeft("generate", "--model", tiny_model_dir, "--prompts-file", tmp_path / name, "--max-new-tokens", 3)
        assert result.exit_code == 0, result.output
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1]
    assert [line for line in outputs[0].splitlines() if line.startswith("> ")] == ["> first", "> second"]


@pytest.mark.parametrize(
    ("content", "suffix", "message", "code"),
    [
        ('{"prompt": "ok"}\n{"prompt": 3}\n', ".jsonl", "line 2: needs a `prompt` field holding a string", 3),
        ('{"prompt": "ok"}\nnot json\n', ".jsonl", "line 2: not valid JSON", 3),
        ("\n\n", ".txt", "holds no prompt; write one prompt per line", 3),
    ],
)
def test_bad_prompts_file(tiny_model_dir, tmp_path, content, suffix, message, code):
    path = tmp_path / f"prompts{suffix}"
    path.write_text(content)
    result = lpeft("generate", "--model", tiny_model_dir, "--prompts-file", path)
    assert result.exit_code == code and message in error_line(result)


def test_usage_errors(tiny_model_dir, two_adapters, tmp_path):
    one, two = two_adapters
    cases = [
        (["--prompt", "x", "--prompts-file", __file__], "with `--prompt TEXT` (repeatable) or `--prompts-file FILE`"),
        ([], "with `--prompt TEXT` (repeatable) or `--prompts-file FILE`, not both"),
        (["--prompt", "x", "--adapter", f"a={one}", "--adapter", f"a={two}"], "the name 'a' is taken"),
        (["--prompt", "x", "--adapter", f"base={one}"], "the name 'base' is reserved"),
    ]
    for args, message in cases:
        result = lpeft("generate", "--model", tiny_model_dir, *args)
        assert result.exit_code == 2 and message in error_line(result), args
    no_template = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, no_template)
    for path in no_template.glob("chat_template.*"):
        path.unlink()
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    result = lpeft("generate", "--model", no_template, "--prompt", "x", "--chat")
    assert result.exit_code == 2 and "has no chat template; send the prompts as plain text (no --chat)" in error_line(
        result
    )


def test_mismatched_adapter_is_one_line(tiny_model_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.intermediate_size = 48
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "other")
    folder = make_adapter(tmp_path / "narrow", tmp_path / "other")
    result = lpeft("generate", "--model", tiny_model_dir, "--adapter", folder, "--prompt", "x")
    assert result.exit_code == 2
    assert "Adapter 'narrow'" in error_line(result) and "has 64 output features" in error_line(result)
    assert len(result.stderr.strip().splitlines()) <= 2  # an INFO line at most, then the error


def test_registry_reference(adapter, tiny_model_dir, tmp_path, monkeypatch):
    from lightning_peft.hub import publish

    monkeypatch.setenv("LPEFT_CACHE", str(tmp_path / "cache"))
    publish(adapter, "acme/caps", registry=tmp_path / "registry", verify=False)
    result = lpeft(
        "generate", "--model", tiny_model_dir, "--adapter", "acme/caps@^1", "--with-base", "--registry",
        tmp_path / "registry", "--prompt", "x", "--max-new-tokens", 4,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["[caps]", "[base]"]


def test_help_does_not_import_torch():
    code = (
        "import sys; from lightning_peft.cli import main\n"
        "try: main(['generate', '--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--prompts-file" in out and out.strip().endswith("False")


@pytest.mark.slow
def test_smollm2_answers_with_an_adapter_and_the_base(smollm2_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # A freshly initialised LoRA (B = 0) must answer exactly like the base, in the same left-padded batch.
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(smollm2_dir), LoraConfig(r=8, target_modules="all-linear")
    )
    model.save_pretrained(tmp_path / "zero")
    result = lpeft(
        "generate", "--model", "smollm2-135m-instruct", "--adapter", tmp_path / "zero", "--with-base", "--chat",
        "--prompt", "What is the capital of France?", "--prompt", "Which city is the capital of Germany? Answer briefly.",
        "--max-new-tokens", 16,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 4 and "Paris" in lines[0] and "Berlin" in lines[2]
    assert lines[0].split(maxsplit=1)[1] == lines[1].split(maxsplit=1)[1]
    assert lines[2].split(maxsplit=1)[1] == lines[3].split(maxsplit=1)[1]
