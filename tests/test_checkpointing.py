"""`gradient_checkpointing`: false, true and "selective" compute the same step; selective keeps less.

Each mode runs the same seeded forward + backward (the same dropout masks: checkpoints restore the RNG state),
and logits and LoRA gradients must equal the plain path's within the reordering tolerance of the arithmetic
(`tolerance.py`). What the backward keeps is counted with `benchmarks.memory_modes.py`.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_families import save_family_model
from tolerance import TINY_FORWARD, assert_close_reordered, reordering_tolerance

from lightning_peft import PeftCausalLM
from lightning_peft.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` is run from the repository root

from benchmarks.memory_modes import per_layer, saved_bytes

# The backward runs the forward's chain of sums again, transposed: twice as many sums in a row reach a gradient.
TINY_BACKWARD = {**TINY_FORWARD, "sums_in_a_row": 2 * TINY_FORWARD["sums_in_a_row"]}


@pytest.fixture(scope="module")
def family_dir(request, tmp_path_factory) -> Path:
    return save_family_model(request.param, tmp_path_factory.mktemp(request.param))


def _module(folder: Path, mode, dropout: float = 0.0, **options) -> PeftCausalLM:
    torch.manual_seed(0)
    adapter = {"r": 4, "lora_alpha": 8, "lora_dropout": dropout, "init_lora_weights": False}  # B != 0: real grads
    module = PeftCausalLM(
        str(folder), adapter=adapter, gradient_checkpointing=mode, save_adapter_on_fit_end=False, **options
    )
    module.configure_model()
    return module


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 250, (2, 48), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "position_ids": (torch.arange(48) % 24).expand(2, 48)}  # two packed examples a row


def _step(module: PeftCausalLM) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(2)  # the same dropout masks in every mode
    logits = module(_batch()).logits
    logits.float().square().mean().backward()
    grads = {name: p.grad for name, p in module.model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def _assert_same_step(got: PeftCausalLM, want: PeftCausalLM) -> None:
    got_logits, got_grads = _step(got)
    want_logits, want_grads = _step(want)
    assert_close_reordered(got_logits, want_logits, **TINY_FORWARD)
    assert got_grads.keys() == want_grads.keys() and any("lora_A" in name for name in want_grads)
    for name, grad in want_grads.items():
        assert_close_reordered(got_grads[name], grad, **TINY_BACKWARD, msg=name)


@pytest.mark.parametrize("family_dir", ["llama", "gemma2"], indirect=True)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("mode", ["selective", True])
def test_checkpointing_equals_the_plain_step(family_dir, dropout, mode):
    checkpointed = _module(family_dir, mode, dropout)
    if mode == "selective":  # the gated MLPs really run the selective forward
        assert all("_selective_forward" in str(layer.mlp.forward) for layer in checkpointed.model.model.model.layers)
    _assert_same_step(checkpointed, _module(family_dir, False, dropout))


@pytest.mark.parametrize("family_dir", ["llama"], indirect=True)
def test_selective_mlp_without_adapters_equals_the_plain_step(family_dir):
    options = {"adapter": {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}}
    modules = []
    for mode in ("selective", False):
        torch.manual_seed(0)
        module = PeftCausalLM(str(family_dir), gradient_checkpointing=mode, save_adapter_on_fit_end=False, **options)
        module.configure_model()
        modules.append(module)
    _assert_same_step(*modules)


@pytest.mark.parametrize("family_dir", ["llama"], indirect=True)
def test_selective_qlora_equals_the_plain_step(family_dir):
    pytest.importorskip("bitsandbytes")
    _assert_same_step(
        _module(family_dir, "selective", quantization="4bit"), _module(family_dir, False, quantization="4bit")
    )


@pytest.mark.parametrize("family_dir", ["llama"], indirect=True)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_census_selective_keeps_less_than_no_checkpointing(family_dir, dropout):
    kept = {}
    for mode in (False, "selective"):
        module = _module(family_dir, mode, dropout)
        kept[mode] = per_layer(saved_bytes(module.model, lambda m=module: m(_batch()).logits.sum()))[0]
    plain, selective = (sum(kept[mode].values()) for mode in (False, "selective"))
    # What selective keeps of a layer: the attention's share and the MLP's input; no MLP intermediate, no
    # dropped-out copy outside the MLP.
    assert not [source for source in kept["selective"] if source.startswith("mlp.") or "lora_dropout" in source]
    assert selective < 0.6 * plain, (kept[False], kept["selective"])


def test_unknown_setting_is_refused():
    with pytest.raises(ConfigError, match=r"`gradient_checkpointing`='full' is not allowed; use false, true or"):
        PeftCausalLM("unused", gradient_checkpointing="full")


# Mixtral without dropout only: PEFT adapts its fused expert weights without dropout (a ConfigError otherwise).
_OTHER_MLPS = [(f, d) for f in ("gpt2", "phi3", "gpt_neox", "falcon", "bloom") for d in (0.0, 0.3)] + [("mixtral", 0.0)]


@pytest.mark.parametrize(("family_dir", "dropout"), _OTHER_MLPS, indirect=["family_dir"])
def test_selective_recomputes_other_mlp_shapes_whole(family_dir, dropout):
    module = _module(family_dir, "selective", dropout)
    layers = [m for m in module.model.modules() if hasattr(m, "mlp") and hasattr(m, "gradient_checkpointing")]
    assert layers and not any(layer.gradient_checkpointing for layer in layers)  # no whole-layer checkpoint
    assert all("recomputed_in_backward" in str(layer.mlp.forward) for layer in layers)
    _assert_same_step(module, _module(family_dir, False, dropout))
    kept = {}
    for mode in (False, "selective"):
        counted = _module(family_dir, mode, dropout)
        kept[mode] = per_layer(saved_bytes(counted.model, lambda m=counted: m(_batch()).logits.sum()))[0]
    # The MLP keeps its input only (saved by the checkpoint, counted under the layer, not under `mlp.`).
    assert any(source.startswith("mlp.") for source in kept[False]), kept[False]
    assert not [source for source in kept["selective"] if source.startswith("mlp.")], kept["selective"]
    assert sum(kept["selective"].values()) < sum(kept[False].values())


@pytest.mark.parametrize("family_dir", ["gpt2"], indirect=True)
def test_selective_falls_back_to_full_checkpointing_without_mlp_modules(family_dir, caplog, monkeypatch):
    from lightning_peft import checkpointing

    monkeypatch.setattr(checkpointing, "layer_mlps", lambda model: None)  # as on a decoder without `mlp` modules
    with caplog.at_level(logging.WARNING, logger="lightning_peft.checkpointing"):
        module = _module(family_dir, "selective")
    assert "layers without one, so every layer is checkpointed instead" in caplog.text
    assert module.model.base_model.model.is_gradient_checkpointing
    _assert_same_step(module, _module(family_dir, False))
    with pytest.raises(ConfigError, match=r"would run the decoder layers of .* uncompiled"):
        _module(family_dir, "selective", compile=True)


@pytest.mark.slow  # two 2-process runs; the single-process tests above check the same equality faster
def test_selective_under_ddp_trains_the_same_adapter(tmp_path, tiny_model_dir):
    from helpers import write_run_config
    from safetensors.torch import load_file

    adapters = {}
    for mode in ("selective", False):
        folder = tmp_path / str(mode)
        folder.mkdir()
        model = {"gradient_checkpointing": mode, "adapter": {"r": 2, "lora_dropout": 0.1, "init_lora_weights": False}}
        config = write_run_config(folder, tiny_model_dir, model=model)
        ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
        command = [sys.executable, "-m", "lightning_peft", "fit", "--config", str(config), "--seed_everything", "0"]
        result = subprocess.run([*command, *ddp], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        adapters[mode] = load_file(next(folder.glob("runs/**/adapter/adapter_model.safetensors")))
    # The same computation in another order changes each gradient by rounding only; AdamW's step is scale-free,
    # so each of the 2 steps moves a weight by lr times that relative change at most.
    atol = 2 * 2e-4 * reordering_tolerance(**TINY_BACKWARD)
    for name, weight in adapters[False].items():
        torch.testing.assert_close(adapters["selective"][name], weight, rtol=0, atol=atol, msg=name)
