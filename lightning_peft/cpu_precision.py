"""`trainer.precision` left unset on a CPU with native bf16: measure a training step both ways, keep the faster.

CPUs with AVX512-BF16 or AMX multiply bf16 matrices several times faster than fp32 ones, but a training step is
more than its matmuls (casts, norms, the optimizer), and whether `bf16-mixed` wins depends on the model and the
CPU. So `lpeft fit` times one LoRA training step (forward, loss, backward, AdamW step) of the run's base model in
`32-true` and in `bf16-mixed`, with the run's adapter and quantization (QLoRA's 4-bit layers compute in the
step's dtype too), on one row of the run's length, and picks `bf16-mixed` only when it is clearly faster
(`MARGIN`). The answer is cached per CPU, torch version, thread count, model, quantization, adapter and row length
(`<cache>/cpu-precision.json`), so the probe is paid once. CPUs without native bf16 (where a bf16 matmul is
hundreds of times slower) never run it and stay in fp32; `LPEFT_PRECISION_PROBE=0` turns it off (fp32).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from lightning_peft import atomic
from lightning_peft.models import cache_root

log = logging.getLogger(__name__)

FP32, BF16 = "32-true", "bf16-mixed"
#: bf16-mixed must take at most this fraction of fp32's step time: a tie is not worth bf16's rounding.
MARGIN = 0.9
#: The probe's row length at most: the ratio is already settled there, and a longer row costs start-up time.
PROBE_TOKENS = 512
PROBE_ENV = "LPEFT_PRECISION_PROBE"


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), by torch's own checks."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def probe_enabled() -> bool:
    return os.environ.get(PROBE_ENV, "1") != "0" and native_bf16()


def measured_precision(
    model_name_or_path: str, quantization: str = "none", tokens: int = PROBE_TOKENS, adapter: Any = None
) -> str:
    """`bf16-mixed` when a training step of this model measured faster in it on this CPU, else `32-true`.

    `adapter` is the run's `adapter` setting (see `adapters.build_peft_config`; None: LoRA's defaults).
    """
    tokens = min(tokens, PROBE_TOKENS)
    key = cache_key(model_name_or_path, quantization, tokens, adapter)
    cached = _read_cache().get(key)
    if cached is not None:
        log.info("`trainer.precision`: %s (measured before on this CPU: %s)", cached["precision"], _why(cached))
        return cached["precision"]
    try:
        with _rng_untouched():
            seconds = {
                p: step_seconds(model_name_or_path, p, quantization, tokens, adapter=adapter) for p in (FP32, BF16)
            }
    except Exception as err:  # a model the probe cannot train both ways trains in fp32, as before
        log.info("`trainer.precision`: 32-true (the bf16 probe failed: %s)", err)
        return FP32
    result = {"precision": choose(seconds), "seconds": seconds}
    _write_cache(key, result)
    log.info("`trainer.precision`: %s (%s; set trainer.precision to choose)", result["precision"], _why(result))
    return result["precision"]


@contextmanager
def _rng_untouched() -> Iterator[None]:
    """Restore torch's, numpy's and Python's random states afterwards: the run is seeded before the probe, and
    the probe's model and tokens must not shift its adapter initialization and dropout masks (a first run, which
    probes, would otherwise train differently from the next ones, which read the cache)."""
    import random

    import numpy as np
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def choose(seconds: dict[str, float]) -> str:
    """bf16-mixed only when its step took at most `MARGIN` of fp32's."""
    return BF16 if seconds[BF16] <= MARGIN * seconds[FP32] else FP32


def step_seconds(
    model_name_or_path: str, precision: str, quantization: str, tokens: int, steps: int = 2, adapter: Any = None
) -> float:
    """The best of `steps` timed training steps of the `adapter` on one row of `tokens` random tokens, after a
    warm-up step."""
    import torch

    from lightning_peft import adapters
    from lightning_peft.models import dtype_for_precision, load_base_model

    base = load_base_model(model_name_or_path, quantization=quantization, dtype=dtype_for_precision(precision))
    model = adapters.inject_adapter(base, adapters.build_peft_config(adapter), quantized=quantization != "none")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(3, model.get_input_embeddings().num_embeddings, (1, tokens))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == BF16 else nullcontext()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def cache_key(model_name_or_path: str, quantization: str, tokens: int, adapter: Any = None) -> str:
    """What the answer depends on: the CPU, torch, its threads, the model, its adapter and the row length."""
    import torch

    parts = (cpu_name(), f"torch {torch.__version__}", f"{torch.get_num_threads()} threads", str(model_name_or_path))
    adapter_key = "default adapter" if adapter is None else json.dumps(adapter, sort_keys=True, default=str)
    return "|".join((*parts, quantization, adapter_key, f"{tokens} tokens"))


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _why(result: dict[str, Any]) -> str:
    fp32, bf16 = result["seconds"][FP32], result["seconds"][BF16]
    return f"a training step took {bf16:.3g} s in bf16-mixed, {fp32:.3g} s in 32-true"


def cache_file() -> Path:
    return cache_root() / "cpu-precision.json"


def _read_cache() -> dict[str, Any]:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, result: dict[str, Any]) -> None:
    cache = {**_read_cache(), key: result}
    cache_file().parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(cache_file(), json.dumps(cache, indent=1, sort_keys=True))
