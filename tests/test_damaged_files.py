"""Damaged, missing and unreadable files: every command that reads an adapter, a model or a package fails with one
line naming the file and the fix, exit code 3, no traceback, and writes nothing (`lightning_peft.files`)."""

from __future__ import annotations

import os
import re
import shutil

import pytest
from helpers import write_run_config
from hub_server import lpeft, make_adapter

from lightning_peft.errors import CorruptFileError, UnreadableFileError
from lightning_peft.files import check_folder, load_safetensors, read_json, read_safetensors_header

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def cut_header(path):
    path.write_bytes(path.read_bytes()[:50])


def break_json(path):
    path.write_text('{"r": 2,')


# damage kind → (file it damages, how, what the message says about it: a regex)
DAMAGE = {
    "truncated weights": (WEIGHTS, truncate, r"is damaged \(truncated: tensor"),
    "incomplete header": (WEIGHTS, cut_header, r"is damaged \(incomplete safetensors header\)"),
    "invalid config JSON": (CONFIG, break_json, r"is damaged \(invalid JSON: Expecting property name"),
    "missing folder": (None, shutil.rmtree, "is not a folder|is neither an existing folder"),
    "file, not folder": (None, lambda p: (shutil.rmtree(p), p.write_text("x")), "is not a folder|is neither an"),
}


@pytest.fixture(scope="module")
def pristine(tiny_model_dir, tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("pristine") / "adapter", tiny_model_dir)


def damaged_adapter(pristine, tmp_path, kind):
    folder = tmp_path / "run" / "adapter"
    shutil.copytree(pristine, folder)
    name, damage, message = DAMAGE[kind]
    damage(folder / name if name else folder)
    return folder, str(folder / name if name else folder), message


def commands(adapter, base, tmp_path):
    """Each command that reads an adapter folder, as arguments to `lpeft`; `out` is where it would write."""
    out = tmp_path / "out"
    config = write_run_config(tmp_path, base, model={"adapter_path": str(adapter), "adapter": None})
    return {
        "merge": ["merge", adapter, "--out", out, "--base", base],
        "generate": ["generate", "--model", base, "--adapter", adapter, "--prompt", "hi", "--max-new-tokens", "2"],
        "publish": ["publish", adapter, "acme/x", "--registry", tmp_path / "registry", "--base", base, "--out", out],
        "inspect": ["inspect", adapter],
        "fit": ["fit", "--config", config],
        "predict": ["predict", "--config", config],
    }


def assert_one_line(result, named, message, code=None):
    code = code or (2 if "is not a folder" in message else 3)  # a wrong path is a usage error, a damaged file data
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("lpeft:")]
    assert len(lines) == 1 and lines[0].startswith("lpeft: error: "), result.stderr
    assert named in lines[0] and re.search(message, lines[0]), lines[0]
    return lines[0]


# Commands whose ADAPTER_DIR argument click checks (`click.Path(file_okay=False)`): a file there is a usage error.
CLICK_CHECKS_THE_FOLDER = {"merge", "publish", "inspect"}


@pytest.mark.parametrize("kind", list(DAMAGE))
@pytest.mark.parametrize("command", ["merge", "generate", "publish", "inspect", "fit", "predict"])
def test_damaged_adapter_is_one_line_naming_the_file(pristine, tiny_model_dir, tmp_path, command, kind):
    adapter, named, message = damaged_adapter(pristine, tmp_path, kind)
    result = lpeft(*commands(adapter, tiny_model_dir, tmp_path)[command])
    if kind == "file, not folder" and command in CLICK_CHECKS_THE_FOLDER:
        assert result.exit_code == 2 and f"Directory '{adapter}' is a file" in result.stderr  # click's usage error
        return
    line = assert_one_line(result, named, message)
    fixes = ("re-download or re-save it", "check the path", "pass the folder", "give a PEFT", "registry reference")
    assert any(fix in line for fix in fixes), line
    assert not (tmp_path / "out").exists() and not (tmp_path / "registry").exists()


@pytest.mark.parametrize(("name", "damage"), [("config.json", break_json), ("model.safetensors", cut_header)])
@pytest.mark.parametrize("command", ["merge", "generate", "fit"])
def test_damaged_base_model_is_one_line_naming_the_file(pristine, tiny_model_dir, tmp_path, command, name, damage):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    damage(base / name)
    result = lpeft(*commands(pristine, base, tmp_path)[command])
    assert_one_line(result, str(base / name), "re-download the model or save it again")
    assert not (tmp_path / "out").exists()


def test_pull_names_a_damaged_manifest(adapter, tmp_path):
    registry = tmp_path / "registry"
    assert lpeft("publish", adapter, "acme/x", "--registry", registry, "--no-verify").exit_code == 0
    (registry / "acme/x/1.0.0/lpeft_manifest.json").write_text("{")
    result = lpeft("pull", "acme/x", "--to", tmp_path / "pulled", "--registry", registry)
    assert_one_line(result, "acme/x 1.0.0: lpeft_manifest.json", r"is damaged \(invalid JSON: .*\): publish this")
    assert not (tmp_path / "pulled").exists()


def test_damaged_tokenizer_file_in_an_adapter_folder(pristine, tiny_model_dir, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(pristine, folder)
    (folder / "tokenizer_config.json").write_text("not json")
    result = lpeft("merge", folder, "--out", tmp_path / "out", "--base", tiny_model_dir)
    assert_one_line(result, str(folder / "tokenizer_config.json"), "invalid JSON")


def test_debug_shows_the_traceback(pristine, tiny_model_dir, tmp_path):
    adapter, _, _ = damaged_adapter(pristine, tmp_path, "incomplete header")
    result = lpeft("--debug", "inspect", adapter)
    assert result.exit_code != 0 and isinstance(result.exception, CorruptFileError)


# The readers themselves.


def test_read_json_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{\n  "a": 1,\n}')
    with pytest.raises(CorruptFileError, match=r"x.json is damaged \(invalid JSON: .* at line 3 column 1\): re-down"):
        read_json(path)
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(CorruptFileError, match=r"is damaged \(not UTF-8 text, byte 7\)"):
        read_json(path)
    with pytest.raises(FileNotFoundError, match="nope.json does not exist: fix it."):
        read_json(tmp_path / "nope.json", fix="fix it")
    with pytest.raises(CorruptFileError, match="is a folder, not a file"):
        read_json(tmp_path)


def test_safetensors_checks(pristine, tmp_path):
    path = tmp_path / WEIGHTS
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CorruptFileError, match=r"is damaged \(2 bytes, shorter than a safetensors header\)"):
        read_safetensors_header(path)
    path.write_bytes((8).to_bytes(8, "little") + b"[1,2,3] ")
    with pytest.raises(CorruptFileError, match="the safetensors header is not a JSON object"):
        read_safetensors_header(path)
    path.write_bytes((2).to_bytes(8, "little") + b"{]")
    with pytest.raises(CorruptFileError, match="the safetensors header is not valid JSON"):
        load_safetensors(path)
    good = (pristine / WEIGHTS).read_bytes()
    path.write_bytes(good[:-1])
    with pytest.raises(CorruptFileError, match="truncated: tensor .* ends past the end of the file"):
        load_safetensors(path)
    path.write_bytes(good)
    assert load_safetensors(path).keys() == read_safetensors_header(path)[0].keys() - {"__metadata__"}


def test_unreadable_files_and_folders(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    path.write_text("{}")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("pathlib.Path.read_bytes", denied)
    with pytest.raises(UnreadableFileError, match=r"x.json cannot be read \(permission denied\): give this user read"):
        read_json(path)
    monkeypatch.setattr(os, "listdir", denied)
    with pytest.raises(UnreadableFileError, match="cannot be read"):
        check_folder(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file whatever its mode")
def test_unreadable_adapter_folder_is_exit_code_3(pristine, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(pristine, folder)
    folder.chmod(0)
    try:
        result = lpeft("inspect", folder)
    finally:
        folder.chmod(0o755)
    assert_one_line(result, str(folder), "cannot be read (permission denied)")


def test_damaged_run_file_is_named_when_publishing(pristine, tiny_model_dir, tmp_path):
    adapter, _, _ = damaged_adapter(pristine, tmp_path, "truncated weights")
    shutil.copy(pristine / WEIGHTS, adapter / WEIGHTS)
    (adapter.parent / "run_summary.json").write_text('{"steps": 3')
    result = lpeft("publish", adapter, "acme/x", "--registry", tmp_path / "registry", "--no-verify")
    line = assert_one_line(result, str(adapter.parent / "run_summary.json"), r"is damaged \(invalid JSON")
    assert line.endswith("delete it (the card then leaves out what it records) or pass --run-dir.")
    assert not [p for p in (tmp_path / "registry").rglob("*") if p.is_file()]  # (an empty .staging folder stays)


def test_prompts_file_that_is_not_text(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"caf\xe9\n")
    result = lpeft("generate", "--model", tiny_model_dir, "--prompts-file", prompts)
    assert_one_line(result, str(prompts), r"is damaged \(not UTF-8 text, byte 3\): save it as UTF-8 text")
