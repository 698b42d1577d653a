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
