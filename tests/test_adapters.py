"""Adapter configs, injection and plain-PEFT save/load (no Trainer involved)."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_peft import adapters
from lightning_peft.errors import ConfigError


def test_plain_mapping_is_lora_on_all_linear_layers():
    config = adapters.build_peft_config({"r": 8, "use_dora": True, "use_rslora": True})
    assert isinstance(config, peft.LoraConfig)
    assert (config.r, config.use_dora, config.use_rslora) == (8, True, True)
    assert config.target_modules == "all-linear"
    assert config.task_type == "CAUSAL_LM"


@pytest.mark.parametrize(
    ("class_path", "expected"),
    [
        ("AdaLoraConfig", peft.AdaLoraConfig),
        ("peft.IA3Config", peft.IA3Config),
        ("peft.LoHaConfig", peft.LoHaConfig),
        ("PromptTuningConfig", peft.PromptTuningConfig),
    ],
)
def test_class_path_selects_any_peft_method(class_path, expected):
    config = adapters.build_peft_config({"class_path": class_path, "init_args": {}})
    assert type(config) is expected
    assert config.task_type == "CAUSAL_LM"


def test_explicit_target_modules_are_kept_and_ia3_keeps_peft_defaults():
    assert adapters.build_peft_config({"target_modules": ["q_proj"]}).target_modules == {"q_proj"}
    assert adapters.build_peft_config({"class_path": "IA3Config"}).target_modules is None


def test_a_peft_config_instance_is_copied_not_mutated():
    original = peft.LoraConfig(r=4)
    config = adapters.build_peft_config(original)
    assert config is not original and original.target_modules is None and config.target_modules == "all-linear"


@pytest.mark.parametrize(
    "adapter",
    [
        {"r": 4, "use_dora": True},
        {"class_path": "AdaLoraConfig", "init_args": {"init_r": 6}},
        {"class_path": "IA3Config"},
        {"class_path": "PromptEncoderConfig", "init_args": {"num_virtual_tokens": 3, "encoder_hidden_size": 8}},
    ],
)
def test_config_to_dict_round_trips_through_json(adapter):
    config = adapters.build_peft_config(adapter)
    data = json.loads(json.dumps(adapters.config_to_dict(config)))
    assert adapters.build_peft_config(data) == config


def test_adalora_total_step_is_left_for_the_trainer():
    config = adapters.build_peft_config({"class_path": "AdaLoraConfig"})
    assert config.total_step is None
    assert adapters.fill_total_step(config, 7).total_step == 7
    with pytest.raises(ConfigError, match=r"set `adapter.init_args.total_step` or `trainer.max_steps`"):
        adapters.fill_total_step(config, -1)
    lora = adapters.build_peft_config({"r": 2})
    assert adapters.fill_total_step(lora, None) is lora
    given = adapters.build_peft_config({"class_path": "AdaLoraConfig", "init_args": {"total_step": 3}})
    assert adapters.fill_total_step(given, 7).total_step == 3


@pytest.mark.parametrize(
    ("class_path", "expected"),
    [("AdaLoraConfig", True), ("peft.tuners.adalora.config.AdaLoraConfig", True), ("peft.LoraConfig", False)],
)
def test_is_adalora(class_path, expected):
    assert adapters.is_adalora(class_path) is expected


@pytest.mark.parametrize(
    ("adapter", "match"),
    [
        ({"rank": 4}, r"fields \['rank'\] that LoraConfig does not know"),
        ({"class_path": "peft.NoSuchConfig"}, r"`adapter.class_path`='peft.NoSuchConfig' is not a peft config"),
        ({"class_path": "torch.nn.Linear"}, r"not a subclass of peft.PeftConfig"),
        ({"class_path": "LoraConfig", "r": 4}, r"keys \['r'\] beside class_path/init_args"),
        ({"layers_pattern": "layers"}, r"`adapter` \(LoraConfig\) is invalid: .*layers_to_transform"),
        ("lora", r"`adapter` must be a mapping"),
    ],
)
def test_bad_adapter_settings_are_clear_errors(adapter, match):
    with pytest.raises(ConfigError, match=match):
        adapters.build_peft_config(adapter)


@pytest.fixture
def tiny_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def test_target_that_matches_nothing_lists_the_linear_layers(tiny_model):
    config = adapters.build_peft_config({"target_modules": ["q_proj", "qkv_proj"]})
    with pytest.raises(ConfigError, match=r"\['qkv_proj'\] match no module.*down_proj, gate_proj, k_proj"):
        adapters.inject_adapter(tiny_model, config)


def test_regex_target_that_matches_nothing_fails(tiny_model):
    config = adapters.build_peft_config({"target_modules": r".*\.attention\.wq"})
    with pytest.raises(ConfigError, match="match no module"):
        adapters.inject_adapter(tiny_model, config)


def _perturb(model: torch.nn.Module) -> None:
    """Give the adapter non-zero weights so that it changes the logits (LoRA B starts at zero)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def test_save_then_plain_peft_reload_gives_identical_logits(tiny_model_dir, tmp_path, tiny_tokenizer):
    model = adapters.inject_adapter(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapters.build_peft_config({"r": 4})
    )
    _perturb(model)
    model.eval()
    folder = adapters.save_adapter(model, tmp_path / "adapter", tiny_tokenizer)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}

    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(3, 200, (2, 10))
    with torch.no_grad():
        expected, got, plain = model(ids).logits, reloaded(ids).logits, base(ids).logits
    assert torch.equal(expected, got)
    assert not torch.allclose(expected, plain, atol=1e-3), "the adapter must change the logits for this test"


def test_save_is_atomic_and_replaces_the_previous_adapter(tiny_model_dir, tmp_path, monkeypatch):
    model = adapters.inject_adapter(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapters.build_peft_config({"r": 4})
    )
    target = adapters.save_adapter(model, tmp_path / "adapter")
    before = (target / "adapter_model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    _perturb(model)
    monkeypatch.setattr(type(model), "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        adapters.save_adapter(model, target)
    assert (target / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "no staging folder may be left behind"


def test_load_adapter_refuses_pickle_only_weights(tiny_model_dir, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "adapter_model.bin").write_bytes(b"not unpickled")
    (tmp_path / "empty").mkdir()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"no adapter_model.safetensors; pickle weights \(.bin\) are never loaded"):
        adapters.load_adapter(base, tmp_path)
    with pytest.raises(ConfigError, match="adapter_config.json is missing"):
        adapters.load_adapter(base, tmp_path / "empty")
    with pytest.raises(ConfigError, match="nothing is not a folder: it does not exist; check the path"):
        adapters.load_adapter(base, tmp_path / "nothing")


def test_adapter_state_keys_hold_the_adapter_and_nothing_of_the_base(tiny_model_dir):
    model = adapters.inject_adapter(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapters.build_peft_config({"r": 4})
    )
    keys = adapters.adapter_state_keys(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert keys == trainable
    assert all("lora_" in k for k in keys)
    assert not any("base_layer" in k or "embed_tokens" in k for k in keys)


def test_adalora_regularization_is_added_and_is_differentiable(tiny_model_dir):
    config = adapters.build_peft_config({"class_path": "AdaLoraConfig", "init_args": {"total_step": 10}})
    model = adapters.inject_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    penalty = adapters.adapter_regularization(model)
    assert penalty is not None and penalty.item() > 0 and penalty.requires_grad
    lora = adapters.inject_adapter(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapters.build_peft_config({"r": 2})
    )
    assert adapters.adapter_regularization(lora) is None


def _saved_tensor_names(tiny_model_dir, tmp_path, monkeypatch, grow_by: int = 0, targets=("q_proj", "v_proj")):
    """Save an adapter whose config names its base by a Hub id (as `with_portable_base` writes it), with any Hub
    lookup failing the test; return the tensor names in the adapter file."""
    from peft.utils import save_and_load
    from safetensors import safe_open

    def no_lookup(*args, **kwargs):
        raise AssertionError(f"saving looked the base up on the Hub: {args}")

    monkeypatch.setattr(save_and_load, "check_file_exists_on_hf_hub", no_lookup)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if grow_by:
        base.resize_token_embeddings(base.get_input_embeddings().weight.shape[0] + grow_by)
    model = adapters.inject_adapter(base, adapters.build_peft_config({"r": 4, "target_modules": list(targets)}))
    model.peft_config["default"].base_model_name_or_path = "some-org/some-base"
    folder = adapters.save_adapter(model, tmp_path / "adapter")
    with safe_open(str(folder / "adapter_model.safetensors"), "np") as saved:
        return set(saved.keys())


def test_saving_never_asks_the_hub_about_a_base_loaded_from_a_folder(tiny_model_dir, tmp_path, monkeypatch):
    names = _saved_tensor_names(tiny_model_dir, tmp_path, monkeypatch)
    assert names and not any("embed_tokens" in n or "lm_head" in n for n in names)


def test_a_grown_vocabulary_saves_the_embeddings_without_asking_the_hub(tiny_model_dir, tmp_path, monkeypatch):
    names = _saved_tensor_names(tiny_model_dir, tmp_path, monkeypatch, grow_by=8)
    assert any(n.endswith("embed_tokens.weight") for n in names), names


def test_adapted_embeddings_are_left_to_peft(tiny_model_dir, tmp_path, monkeypatch):
    names = _saved_tensor_names(tiny_model_dir, tmp_path, monkeypatch, targets=("q_proj", "embed_tokens"))
    assert any("embed_tokens" in n for n in names), names
