"""Training processes run on tcmalloc or oneTBB's malloc, not glibc's: glibc's heap nearly doubles a step's peak.

glibc serves an allocation of at least its mmap threshold with a mapping of its own, returned to the system when
freed, and smaller ones from its heap, which keeps freed memory for reuse. The threshold starts at 128 KiB but
rises (up to 32 MiB) whenever a mapped chunk is freed, so once a model is loaded nearly every activation of a
training step comes from the heap; a forward pass frees temporaries between the tensors it keeps for backward,
and the holes they leave do not fit the next, larger tensors, so the heap grows instead. Measured with
`lpeft fit` on SmolLM2 at 8 x 512 tokens (docs/performance.md, "Where lpeft fit's memory goes"): 12.1 GB of peak
RSS with glibc, 7.1 GB with tcmalloc or oneTBB's scalable allocator, at glibc's speed or better. Making glibc
return freed memory at once (`MALLOC_MMAP_THRESHOLD_`) or jemalloc reach 6.5 GB too, but page faults then cost
40% of the throughput.

`lpeft fit` / `validate` / `test` / `predict` therefore re-run themselves (same pid, same command line) with an
allocator preloaded, unless one already is: tcmalloc when the system has it (Debian/Ubuntu:
`libtcmalloc-minimal4`; conda: `gperftools`), else oneTBB's malloc proxy from the `tbb` wheel, which
lightning-peft depends on where PyPI has it (Linux x86-64). `LPEFT_MALLOC=glibc` keeps the system's allocator,
`LPEFT_MALLOC=tcmalloc` or `tbbmalloc` asks for one. Where neither is found, `lpeft fit` says so in one line
(`missing_allocator_hint`).
"""

from __future__ import annotations

import ctypes.util
import importlib.metadata
import os
import platform
import sys
from collections.abc import Mapping

#: The environment variable that chooses: "glibc" keeps the allocator the process started with, "tcmalloc" or
#: "tbbmalloc" asks for that one; unset, the first installed of tcmalloc and tbbmalloc.
SETTING = "LPEFT_MALLOC"
CHOICES = ("glibc", "tcmalloc", "tbbmalloc")
_TCMALLOC = ("tcmalloc_minimal", "tcmalloc")
# oneTBB's allocator, then the proxy that routes malloc/free/new/delete to it (the proxy needs the first loaded).
_TBBMALLOC = ("libtbbmalloc.so.2", "libtbbmalloc_proxy.so.2")
_PRELOADED_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc", "tbbmalloc")


def find_tcmalloc() -> str | None:
    """The tcmalloc library the dynamic loader would find (its soname), or None."""
    for name in _TCMALLOC:
        if library := ctypes.util.find_library(name):
            return library
    return None


def find_tbbmalloc() -> list[str] | None:
    """The paths of oneTBB's allocator and its malloc proxy, as the `tbb` wheel installed them, or None."""
    try:
        files = importlib.metadata.files("tbb") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = {file.name: str(file.locate()) for file in files if file.name in _TBBMALLOC}
    if all(name in found and os.path.exists(found[name]) for name in _TBBMALLOC):
        return [os.path.realpath(found[name]) for name in _TBBMALLOC]
    return None


def preferred_allocator(choice: str | None = None) -> tuple[str, list[str]] | None:
    """(name, libraries to preload) of the allocator `choice` names, or by default the first installed of tcmalloc
    and tbbmalloc; None when it is not installed."""
    finders = {"tcmalloc": lambda: [lib] if (lib := find_tcmalloc()) else None, "tbbmalloc": find_tbbmalloc}
    for name, find in finders.items():
        if choice in (None, name) and (libraries := find()):
            return name, libraries
    return None


def _keeps_its_allocator(environ: Mapping[str, str]) -> bool:
    """Off Linux, when `LPEFT_MALLOC` says glibc, or when an allocator is preloaded (by the user, or by the
    re-run itself: the re-run process never re-runs again, even if the loader could not preload)."""
    if not sys.platform.startswith("linux") or environ.get(SETTING) == "glibc":
        return True
    return any(name in environ.get("LD_PRELOAD", "") for name in _PRELOADED_ALLOCATORS)


def setting_problem(environ: Mapping[str, str]) -> str | None:
    """What is wrong with `LPEFT_MALLOC`, or None."""
    value = environ.get(SETTING)
    if value is None or value == "" or value in CHOICES:
        return None
    return f"{SETTING}={value!r} is not an allocator lightning-peft knows; use one of {', '.join(CHOICES)}"


def allocator_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """`environ` with the allocator `LPEFT_MALLOC` asks for (default: the preferred one) preloaded, or None when the
    process should keep its allocator or the one asked for is not installed."""
    if _keeps_its_allocator(environ) or setting_problem(environ):
        return None
    allocator = preferred_allocator(environ.get(SETTING) or None)
    if allocator is None:
        return None
    name, libraries = allocator
    preload = " ".join([*libraries, environ.get("LD_PRELOAD", "")]).strip()
    return {**environ, "LD_PRELOAD": preload, SETTING: name}


def missing_allocator_hint(environ: Mapping[str, str]) -> str | None:
    """One line telling how to halve training's memory, when this process runs on glibc's malloc only because the
    allocator (the one `LPEFT_MALLOC` asks for, or any) is not installed; None when the user chose glibc or
    preloaded an allocator of their own, or off glibc."""
    if _keeps_its_allocator(environ) or setting_problem(environ) or platform.libc_ver()[0] != "glibc":
        return None
    choice = environ.get(SETTING) or None
    if preferred_allocator(choice):
        return None
    start = f"{SETTING}={choice} asks for {choice}, which is not installed: training" if choice else "Training"
    return (
        f"{start} on glibc's malloc, which can hold up to twice the live tensors at the peak; install tcmalloc "
        "to train in about half the memory at the same speed (Debian/Ubuntu: apt install libtcmalloc-minimal4; "
        f"conda: gperftools), or set {SETTING}=glibc to keep glibc without this note."
    )


def rerun_on_preferred_allocator() -> None:
    """Replace this process with the same command line (interpreter flags included) on the preferred allocator;
    return, doing nothing, when it should keep its allocator."""
    environment = allocator_environment(os.environ)
    if environment is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environment)
