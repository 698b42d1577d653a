"""Training processes re-run themselves on tcmalloc or oneTBB's malloc (lightning_peft.allocator)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from lightning_peft import allocator
from lightning_peft.errors import ConfigError

TCMALLOC = "libtcmalloc_minimal.so.4"
TBB = ["/env/lib/libtbbmalloc.so.2", "/env/lib/libtbbmalloc_proxy.so.2"]


@pytest.fixture
def installed(monkeypatch):
    """Pretend Linux on glibc with both allocators installed; a test removes one with `installed(tcmalloc=None)`."""
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("glibc", "2.36"))

    def install(tcmalloc=TCMALLOC, tbbmalloc=TBB):
        monkeypatch.setattr(allocator, "find_tcmalloc", lambda: tcmalloc)
        monkeypatch.setattr(allocator, "find_tbbmalloc", lambda: tbbmalloc)

    install()
    return install


def test_tcmalloc_first_preloaded_before_what_was_there(installed):
    environment = allocator.allocator_environment({"LD_PRELOAD": "libmine.so", "PATH": "/bin"})
    assert environment == {"LD_PRELOAD": f"{TCMALLOC} libmine.so", "PATH": "/bin", allocator.SETTING: "tcmalloc"}


def test_tbbmalloc_where_tcmalloc_is_missing_or_when_asked(installed):
    installed(tcmalloc=None)
    environment = allocator.allocator_environment({})
    assert environment == {"LD_PRELOAD": " ".join(TBB), allocator.SETTING: "tbbmalloc"}
    installed()
    asked = allocator.allocator_environment({allocator.SETTING: "tbbmalloc"})
    assert asked["LD_PRELOAD"] == " ".join(TBB)


@pytest.mark.parametrize(
    "environ",
    [
        {allocator.SETTING: "glibc"},  # the user keeps the system allocator
        {allocator.SETTING: "tcmalloc", "LD_PRELOAD": TCMALLOC},  # the re-run process: never again
        {allocator.SETTING: "tbbmalloc", "LD_PRELOAD": " ".join(TBB)},
        {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},  # the user chose another allocator
        {allocator.SETTING: "jemalloc"},  # not a choice: refused by `lpeft fit` (below)
    ],
)
def test_the_process_keeps_its_allocator_when_told_or_already_chosen(installed, environ):
    assert allocator.allocator_environment(environ) is None
    assert allocator.missing_allocator_hint(environ) is None


def test_nothing_changes_without_an_allocator_or_off_linux(installed, monkeypatch):
    installed(tcmalloc=None, tbbmalloc=None)
    assert allocator.allocator_environment({}) is None
    installed()
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.allocator_environment({}) is None


def test_the_tbb_wheels_libraries_are_found_where_it_is_installed():
    """Where the `tbb` dependency is installed (Linux x86-64), its allocator and proxy are files that exist."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("tbb")
    except PackageNotFoundError:
        assert allocator.find_tbbmalloc() is None
        return
    libraries = allocator.find_tbbmalloc()
    assert [os.path.basename(p).split(".so")[0] for p in libraries] == ["libtbbmalloc", "libtbbmalloc_proxy"]
    assert all(os.path.isfile(p) for p in libraries)


def test_a_hint_names_the_package_when_no_allocator_is_installed(installed, monkeypatch):
    installed(tcmalloc=None, tbbmalloc=None)
    hint = allocator.missing_allocator_hint({})
    assert "libtcmalloc-minimal4" in hint and "gperftools" in hint and f"{allocator.SETTING}=glibc" in hint
    assert "\n" not in hint
    installed(tcmalloc=None)  # asked for tcmalloc, which is missing: said so, though tbbmalloc is there
    assert allocator.missing_allocator_hint({allocator.SETTING: "tcmalloc"}).startswith(
        f"{allocator.SETTING}=tcmalloc asks for tcmalloc, which is not installed"
    )
    assert allocator.missing_allocator_hint({}) is None  # tbbmalloc will do
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))  # musl: the measurement does not apply
    installed(tcmalloc=None, tbbmalloc=None)
    assert allocator.missing_allocator_hint({}) is None


def _fit(tmp_path, tiny_model_dir):
    from test_adapter_checkpoint import write_run_config

    from lightning_peft.cli.lightning import run_lightning_cli

    config = write_run_config(tmp_path, tiny_model_dir, max_steps=1, enable_checkpointing=False)
    return run_lightning_cli(["fit", "--config", str(config)])


def test_lpeft_fit_gives_the_hint_once_it_runs(installed, monkeypatch, tmp_path, tiny_model_dir, caplog):
    installed(tcmalloc=None, tbbmalloc=None)
    monkeypatch.delenv(allocator.SETTING, raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    with caplog.at_level(logging.INFO, logger="lightning_peft"):
        _fit(tmp_path, tiny_model_dir)
    assert [r.getMessage() for r in caplog.records].count(allocator.missing_allocator_hint({})) == 1


def test_lpeft_fit_refuses_an_unknown_allocator(monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setenv(allocator.SETTING, "jemalloc")
    with pytest.raises(ConfigError, match=r"LPEFT_MALLOC='jemalloc' is not an allocator .* glibc, tcmalloc, tbbmalloc"):
        _fit(tmp_path, tiny_model_dir)


# Re-runs itself (the same `python -c`, with tcmalloc hidden when asked), then prints the allocators mapped.
_RERUN = (
    "import sys; from lightning_peft import allocator\n"
    "if 'hide-tcmalloc' in sys.argv: allocator.find_tcmalloc = lambda: None\n"
    "allocator.rerun_on_preferred_allocator()\n"
    "maps = open('/proc/self/maps').read(); print([n for n in ('tcmalloc', 'tbbmalloc_proxy') if n in maps])"
)


@pytest.mark.parametrize(
    ("setting", "hide_tcmalloc", "mapped"),
    [
        (None, False, ["tcmalloc"]),
        (None, True, ["tbbmalloc_proxy"]),
        ("tbbmalloc", False, ["tbbmalloc_proxy"]),
        ("glibc", False, []),
    ],
)
def test_the_rerun_process_runs_on_the_allocator(setting, hide_tcmalloc, mapped):
    if "tcmalloc" in mapped and allocator.find_tcmalloc() is None:
        pytest.skip("tcmalloc is not installed (apt install libtcmalloc-minimal4; CI installs it)")
    if "tbbmalloc_proxy" in mapped and allocator.find_tbbmalloc() is None:
        pytest.skip("the tbb wheel exists for Linux x86-64 only")
    environment = {k: v for k, v in os.environ.items() if k not in (allocator.SETTING, "LD_PRELOAD")}
    if setting:
        environment[allocator.SETTING] = setting
    command = [sys.executable, "-c", _RERUN, *(["hide-tcmalloc"] if hide_tcmalloc else [])]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == repr(mapped)


@pytest.mark.skipif(allocator.find_tbbmalloc() is None, reason="the tbb wheel exists for Linux x86-64 only")
def test_a_whole_fit_trains_on_tbbmalloc(tmp_path, tiny_model_dir):
    """`lpeft fit` as a user runs it, re-run on oneTBB's malloc proxy (malloc, free and C++ new replaced in
    torch, tokenizers and every other library): it trains and writes its checkpoint."""
    from test_adapter_checkpoint import write_run_config

    config = write_run_config(tmp_path, tiny_model_dir, max_steps=2)
    environment = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    environment[allocator.SETTING] = "tbbmalloc"
    command = [sys.executable, "-m", "lightning_peft", "fit", "--config", str(config)]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs").rglob("checkpoints/*")) == ["epoch=0-step=2", "last"]
