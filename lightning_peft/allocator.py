"""Training processes run on tcmalloc when the machine has it: glibc's heap nearly doubles a step's peak memory.

glibc serves an allocation of at least its mmap threshold with a mapping of its own, returned to the system when
freed, and smaller ones from its heap, which keeps freed memory for reuse. The threshold starts at 128 KiB but
rises (up to 32 MiB) whenever a mapped chunk is freed, so once a model is loaded nearly every activation of a
training step comes from the heap; a forward pass frees temporaries between the tensors it keeps for backward,
and the holes they leave do not fit the next, larger tensors, so the heap grows instead. Measured with
`lpeft fit` on SmolLM2 at 8 x 512 tokens (docs/performance.md, "Where lpeft fit's memory goes"): 11.1 GB of peak
RSS with glibc, 6.7 GB with tcmalloc at the same speed. Making glibc return freed memory at once
(`MALLOC_MMAP_THRESHOLD_`) or jemalloc reach 6.5 GB too, but page faults then cost 40% of the throughput.

`lpeft fit` / `validate` / `test` / `predict` therefore re-run themselves with tcmalloc preloaded when the
library is installed (Debian/Ubuntu: `libtcmalloc-minimal4`; conda: `gperftools`) and no other allocator is;
`LPEFT_MALLOC=glibc` keeps the system's allocator. Where tcmalloc is missing, `lpeft fit` says so in one line
(`missing_tcmalloc_hint`), since the fix is one package away.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import sys
from collections.abc import Mapping

#: The environment variable that chooses: "glibc" (or "system") keeps the system allocator.
SETTING = "LPEFT_MALLOC"
_TCMALLOC = ("tcmalloc_minimal", "tcmalloc")
_OTHER_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


def find_tcmalloc() -> str | None:
    """The tcmalloc library the dynamic loader would find (its soname), or None."""
    for name in _TCMALLOC:
        if library := ctypes.util.find_library(name):
            return library
    return None


def tcmalloc_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """`environ` with tcmalloc preloaded, or None when the process should keep its allocator: off Linux, when
    `LPEFT_MALLOC` says so or was already acted on, when another allocator is preloaded or tcmalloc is missing."""
    if not sys.platform.startswith("linux") or environ.get(SETTING):
        return None
    preload = environ.get("LD_PRELOAD", "")
    if any(name in preload for name in _OTHER_ALLOCATORS):
        return None
    library = find_tcmalloc()
    if library is None:
        return None
    # SETTING marks the re-run process, so it never re-runs again (even if the loader could not preload).
    return {**environ, "LD_PRELOAD": f"{library} {preload}".strip(), SETTING: "tcmalloc"}


def missing_tcmalloc_hint(environ: Mapping[str, str]) -> str | None:
    """One line telling how to halve training's memory, when this process runs on glibc's malloc only because
    tcmalloc is not installed (not when the user chose glibc or preloaded an allocator of their own)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc" or environ.get(SETTING):
        return None
    if any(name in environ.get("LD_PRELOAD", "") for name in _OTHER_ALLOCATORS) or find_tcmalloc():
        return None
    return (
        "Training on glibc's malloc, which can hold up to twice the live tensors at the peak; install tcmalloc "
        "to train in about half the memory at the same speed (Debian/Ubuntu: apt install libtcmalloc-minimal4; "
        f"conda: gperftools), or set {SETTING}=glibc to keep glibc without this note."
    )


def rerun_with_tcmalloc() -> None:
    """Replace this process with the same command line (interpreter flags included) on tcmalloc; return, doing
    nothing, when it should keep its allocator."""
    environment = tcmalloc_environment(os.environ)
    if environment is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environment)
