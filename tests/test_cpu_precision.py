"""`trainer.precision` unset on a CPU with native bf16: a measured, cached choice between bf16-mixed and 32-true."""

from __future__ import annotations

import logging

import pytest
from jsonargparse import Namespace

from lightning_peft import cpu_precision
from lightning_peft.cli.lightning import LpeftCLI
from lightning_peft.cpu_precision import BF16, FP32


@pytest.fixture
def probe(monkeypatch, tmp_path):
    """The probe switched on, with its cache under tmp_path and step times that `probe.seconds` sets."""
    monkeypatch.setenv("LPEFT_CACHE", str(tmp_path))
    monkeypatch.setenv(cpu_precision.PROBE_ENV, "1")
    monkeypatch.setattr(cpu_precision, "native_bf16", lambda: True)
    calls = []

    def step_seconds(model, precision, quantization, tokens, adapter=None):
        calls.append((model, precision, tokens))
        fake.adapters.append(adapter)
        return fake.seconds[precision]

    monkeypatch.setattr(cpu_precision, "step_seconds", step_seconds)
    fake = Namespace(seconds={FP32: 1.0, BF16: 0.5}, calls=calls, adapters=[])
    return fake


@pytest.mark.parametrize(("bf16_seconds", "chosen"), [(0.5, BF16), (0.9, BF16), (0.95, FP32), (2.0, FP32)])
def test_bf16_only_where_clearly_faster(bf16_seconds, chosen):
    assert cpu_precision.choose({FP32: 1.0, BF16: bf16_seconds}) == chosen


def test_measured_once_then_cached(probe, caplog):
    with caplog.at_level(logging.INFO, logger="lightning_peft.cpu_precision"):
        assert cpu_precision.measured_precision("some-model", tokens=2048) == BF16
        assert cpu_precision.measured_precision("some-model", tokens=2048) == BF16
    assert probe.calls == [("some-model", FP32, 512), ("some-model", BF16, 512)]  # rows capped at PROBE_TOKENS
    assert "bf16-mixed (a training step took 0.5 s in bf16-mixed, 1 s in 32-true" in caplog.text
    assert "measured before on this CPU" in caplog.text
    probe.seconds = {FP32: 1.0, BF16: 2.0}
    assert cpu_precision.measured_precision("other-model") == FP32  # another model, another measurement
    assert len(probe.calls) == 4
    probe.seconds = {FP32: 1.0, BF16: 0.5}
    dora = {"r": 8, "use_dora": True}
    assert cpu_precision.measured_precision("other-model", adapter=dora) == BF16  # another adapter, measured
    assert len(probe.calls) == 6 and probe.adapters[-1] == dora


def test_failed_probe_keeps_fp32(probe, monkeypatch):
    def broken(*args):
        raise RuntimeError("no bf16 kernel")

    monkeypatch.setattr(cpu_precision, "step_seconds", broken)
    assert cpu_precision.measured_precision("some-model") == FP32


def _config(adapter=None, **trainer):
    return Namespace(
        trainer=Namespace(precision=None, **trainer),
        model=Namespace(init_args=Namespace(model_name_or_path="m", quantization="none", adapter=adapter)),
        data=Namespace(init_args=Namespace(max_length=128)),
    )


def _auto(subcommand, config):
    cli = LpeftCLI.__new__(LpeftCLI)  # only the precision choice, no parsing
    cli.subcommand = subcommand
    return cli._auto_precision(config)


def test_fit_on_a_bf16_cpu_uses_the_measurement(probe):
    assert _auto("fit", _config(accelerator="auto")) == BF16
    assert probe.calls[-1] == ("m", BF16, 128)
    # The run's adapter is what the probe trains: class_path/init_args arrive as a jsonargparse Namespace.
    ia3 = Namespace(class_path="peft.IA3Config", init_args=Namespace(target_modules=["q_proj"]))
    _auto("fit", _config(adapter=ia3, accelerator="cpu"))
    assert probe.adapters[-1] == {"class_path": "peft.IA3Config", "init_args": {"target_modules": ["q_proj"]}}


@pytest.mark.parametrize(
    ("subcommand", "accelerator", "env", "native"),
    [("validate", "cpu", "1", True), ("fit", "gpu", "1", True), ("fit", "cpu", "0", True), ("fit", "cpu", "1", False)],
)
def test_fp32_without_a_probe(probe, monkeypatch, subcommand, accelerator, env, native):
    """Other commands, other accelerators, `LPEFT_PRECISION_PROBE=0` and CPUs without native bf16 keep 32-true."""
    monkeypatch.setenv(cpu_precision.PROBE_ENV, env)
    monkeypatch.setattr(cpu_precision, "native_bf16", lambda: native)
    assert _auto(subcommand, _config(accelerator=accelerator)) == FP32
    assert probe.calls == []


@pytest.mark.parametrize(
    ("quantization", "adapter"), [("none", None), ("none", {"r": 4, "use_dora": True}), ("4bit", {"r": 4})]
)
def test_a_real_probe_step(tiny_model_dir, quantization, adapter):
    """The probe trains the tiny model one step of the run's adapter in each precision, QLoRA included (on any
    CPU; slow ones are only slow)."""
    if quantization != "none":
        pytest.importorskip("bitsandbytes")
    for precision in (FP32, BF16):
        seconds = cpu_precision.step_seconds(str(tiny_model_dir), precision, quantization, 16, steps=1, adapter=adapter)
        assert seconds > 0


def test_the_probe_leaves_the_runs_random_state_as_it_found_it(tmp_path, monkeypatch, tiny_model_dir):
    """The run is seeded before the probe: a first run (which probes) and the next (which reads the cache) must
    draw the same adapter initialization and dropout masks."""
    import random

    import numpy as np
    import torch

    monkeypatch.setenv("LPEFT_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_precision, "PROBE_TOKENS", 16)
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    cpu_precision.measured_precision(str(tiny_model_dir), tokens=16)
    probed = torch.rand(3), np.random.rand(), random.random()
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    cpu_precision.measured_precision(str(tiny_model_dir), tokens=16)  # from the cache this time
    cached = torch.rand(3), np.random.rand(), random.random()
    assert torch.equal(probed[0], cached[0]) and probed[1:] == cached[1:]
