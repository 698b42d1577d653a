"""Training processes re-run themselves on tcmalloc when the machine has it (lightning_peft.allocator)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lightning_peft import allocator


@pytest.fixture
def tcmalloc_found(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator.sys, "platform", "linux")


def test_tcmalloc_is_preloaded_before_what_was_there(tcmalloc_found):
    environment = allocator.tcmalloc_environment({"LD_PRELOAD": "libmine.so", "PATH": "/bin"})
    assert environment == {
        "LD_PRELOAD": "libtcmalloc_minimal.so.4 libmine.so",
        "PATH": "/bin",
        allocator.SETTING: "tcmalloc",
    }


@pytest.mark.parametrize(
    "environ",
    [
        {allocator.SETTING: "glibc"},  # the user keeps the system allocator
        {allocator.SETTING: "tcmalloc"},  # the re-run process: never again
        {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},  # the user chose another allocator
    ],
)
def test_the_process_keeps_its_allocator_when_told_or_already_chosen(tcmalloc_found, environ):
    assert allocator.tcmalloc_environment(environ) is None


def test_nothing_changes_without_tcmalloc_or_off_linux(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    assert allocator.tcmalloc_environment({}) is None
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc.so.4")
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.tcmalloc_environment({}) is None


# Re-runs itself (the same `python -c`), then prints whether tcmalloc is mapped into the process.
_RERUN = (
    "from lightning_peft.allocator import rerun_with_tcmalloc; rerun_with_tcmalloc(); "
    "print(any('tcmalloc' in line for line in open('/proc/self/maps')))"
)


@pytest.mark.skipif(allocator.find_tcmalloc() is None, reason="tcmalloc is not installed (libtcmalloc-minimal4)")
@pytest.mark.parametrize(("setting", "on_tcmalloc"), [(None, "True"), ("glibc", "False")])
def test_the_rerun_process_runs_on_tcmalloc_unless_told_not_to(setting, on_tcmalloc):
    environment = {k: v for k, v in os.environ.items() if k not in (allocator.SETTING, "LD_PRELOAD")}
    if setting:
        environment[allocator.SETTING] = setting
    done = subprocess.run([sys.executable, "-c", _RERUN], env=environment, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == on_tcmalloc


@pytest.fixture
def on_glibc(monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("glibc", "2.36"))


def test_a_hint_names_the_package_when_tcmalloc_is_missing(on_glibc, monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    hint = allocator.missing_tcmalloc_hint({})
    assert "libtcmalloc-minimal4" in hint and "gperftools" in hint and f"{allocator.SETTING}=glibc" in hint
    assert "\n" not in hint


@pytest.mark.parametrize(
    ("environ", "found", "libc"),
    [
        ({}, "libtcmalloc_minimal.so.4", "glibc"),  # installed: the process already re-ran on it
        ({allocator.SETTING: "glibc"}, None, "glibc"),  # the user chose glibc
        ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, None, "glibc"),  # the user brought an allocator
        ({}, None, ""),  # not glibc (musl): the measurement does not apply
    ],
)
def test_no_hint_where_the_choice_is_made(on_glibc, monkeypatch, environ, found, libc):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: found)
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: (libc, ""))
    assert allocator.missing_tcmalloc_hint(environ) is None


def test_lpeft_fit_gives_the_hint_once_it_runs(on_glibc, monkeypatch, tmp_path, tiny_model_dir, caplog):
    import logging

    from test_adapter_checkpoint import write_run_config

    from lightning_peft.cli.lightning import run_lightning_cli

    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    monkeypatch.delenv(allocator.SETTING, raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    config = write_run_config(tmp_path, tiny_model_dir, max_steps=1, enable_checkpointing=False)
    with caplog.at_level(logging.INFO, logger="lightning_peft"):
        run_lightning_cli(["fit", "--config", str(config)])
    assert [r.getMessage() for r in caplog.records].count(allocator.missing_tcmalloc_hint({})) == 1
