"""PeftCausalLM: training, QLoRA on the CPU, adapter-only checkpoints and resume, errors."""

from __future__ import annotations

import pytest
import torch
from helpers import adapter_tensors, quiet_trainer, token_batches
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lightning_peft import PeftCausalLM
from lightning_peft.errors import ConfigError
from lightning_peft.models import auto_precision, dtype_for_precision


def make_module(tiny_model_dir, **kwargs) -> PeftCausalLM:
    kwargs.setdefault("adapter", {"r": 4})
    kwargs.setdefault("save_adapter_on_fit_end", False)
    return PeftCausalLM(str(tiny_model_dir), **kwargs)


def test_loss_falls_on_a_learnable_toy_set(tiny_model_dir, tmp_path):
    # A cyclic pattern (each token determines the next): a model that learns anything drives its loss down.
    ids = torch.tensor([5, 6, 7, 8]).repeat(4, 5)
    data = [{"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}]
    module = make_module(tiny_model_dir, learning_rate=2e-2, lr_scheduler="constant", adapter={"r": 8})
    module.configure_model()
    first = module.evaluate(data)
    quiet_trainer(tmp_path, max_steps=30).fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    last = module.evaluate(data)
    # The tiny random lm_head keeps logits small, so the loss moves less than the accuracy does.
    assert last["loss"] < 0.93 * first["loss"], (first, last)
    assert first["acc"] < 0.1 and last["acc"] > 0.5, (first, last)


def test_frozen_base_weights_stay_frozen_and_unchanged(tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir, learning_rate=1e-2)
    module.configure_model()
    base = {n: p.detach().clone() for n, p in module.model.named_parameters() if not p.requires_grad}
    adapter_before = adapter_tensors(module)
    quiet_trainer(tmp_path, max_steps=3).fit(module, train_dataloaders=token_batches())
    for name, param in module.model.named_parameters():
        if name in base:
            assert not param.requires_grad and torch.equal(param, base[name]), name
    assert any(not torch.equal(v, adapter_tensors(module)[k]) for k, v in adapter_before.items())


def test_qlora_trains_on_the_cpu(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb

    module = make_module(tiny_model_dir, quantization="4bit", learning_rate=1e-2, gradient_checkpointing=True)
    module.configure_model()
    layer = module.model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    assert layer.base_layer.weight.quant_type == "nf4" and layer.base_layer.weight.quant_state.nested
    packed = layer.base_layer.weight.detach().clone()
    before = adapter_tensors(module)
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(module, train_dataloaders=token_batches())
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert torch.equal(layer.base_layer.weight, packed), "4-bit base weights must not change"
    after = adapter_tensors(module)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_8bit_base_trains_on_the_cpu(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb

    module = make_module(tiny_model_dir, quantization="8bit", learning_rate=1e-2)
    module.configure_model()
    assert isinstance(module.model.base_model.model.model.layers[0].mlp.down_proj.base_layer, bnb.nn.Linear8bitLt)
    before = adapter_tensors(module)
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(module, train_dataloaders=token_batches())
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert any(not torch.equal(before[k], v) for k, v in adapter_tensors(module).items())


def test_quantization_options_reach_bitsandbytes(tiny_model_dir):
    module = make_module(tiny_model_dir, quantization="4bit", quantization_options={"bnb_4bit_quant_type": "fp4"})
    module.configure_model()
    weight = module.model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight
    assert weight.quant_type == "fp4"


def test_final_adapter_is_plain_peft_with_identical_logits(tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir, learning_rate=1e-2, save_adapter_on_fit_end=True)
    trainer = quiet_trainer(tmp_path, max_steps=3)
    trainer.fit(module, train_dataloaders=token_batches())
    folder = tmp_path / "lightning_logs" / "version_0" / "adapter"  # the run's own folder, also without a logger
    assert module.final_adapter_dir == folder
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder).eval()
    module.model.eval()
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        assert torch.equal(module.model(ids).logits, reloaded(ids).logits)


def _fit_with_checkpoints(tiny_model_dir, tmp_path, max_steps, ckpt_path=None):
    seed_everything(0)  # the LoRA A matrices start random: both runs must start from the same ones
    module = make_module(tiny_model_dir, learning_rate=1e-2, lr_scheduler="constant")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    trainer = quiet_trainer(tmp_path, max_steps=max_steps, callbacks=[checkpoint], enable_checkpointing=True)
    trainer.fit(module, train_dataloaders=token_batches(n_batches=2), ckpt_path=ckpt_path)
    return module, trainer


def test_checkpoints_hold_the_adapter_only_and_resume_exactly(tiny_model_dir, tmp_path):
    reference, _ = _fit_with_checkpoints(tiny_model_dir, tmp_path / "straight", max_steps=4)

    first, _ = _fit_with_checkpoints(tiny_model_dir, tmp_path / "resumed", max_steps=2)
    last = tmp_path / "resumed" / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert set(checkpoint["state_dict"]) == first.adapter_state_keys()
    assert checkpoint["optimizer_states"] and checkpoint["lr_schedulers"]

    resumed, trainer = _fit_with_checkpoints(tiny_model_dir, tmp_path / "resumed", max_steps=4, ckpt_path=last)
    assert trainer.global_step == 4
    expected, got = adapter_tensors(reference), adapter_tensors(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)


def test_load_from_checkpoint_rebuilds_the_model_and_loads_the_adapter(tiny_model_dir, tmp_path):
    trained, _ = _fit_with_checkpoints(tiny_model_dir, tmp_path, max_steps=2)
    loaded = PeftCausalLM.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert loaded.hparams.adapter == trained.hparams.adapter
    for key, value in adapter_tensors(trained).items():
        assert torch.equal(adapter_tensors(loaded)[key], value), key


def test_a_checkpoint_missing_adapter_tensors_is_refused(tiny_model_dir):
    module = make_module(tiny_model_dir)
    module.configure_model()
    state = adapter_tensors(module)
    state.pop(next(iter(state)))
    with pytest.raises(ConfigError, match="does not fit this adapter: missing"):
        module.load_state_dict(state)


@pytest.mark.parametrize(
    ("adapter", "gradient_checkpointing"),
    [
        ({"class_path": "AdaLoraConfig", "init_args": {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1}}, False),
        ({"class_path": "IA3Config"}, True),
        ({"class_path": "LoKrConfig", "init_args": {"r": 2}}, False),
        ({"class_path": "PrefixTuningConfig", "init_args": {"num_virtual_tokens": 3}}, False),
        ({"class_path": "PromptTuningConfig", "init_args": {"num_virtual_tokens": 3}}, True),
        (
            {"class_path": "PromptEncoderConfig", "init_args": {"num_virtual_tokens": 3, "encoder_hidden_size": 8}},
            False,
        ),
    ],
)
def test_other_peft_methods_train(tiny_model_dir, tmp_path, adapter, gradient_checkpointing):
    module = make_module(
        tiny_model_dir, adapter=adapter, learning_rate=1e-2, gradient_checkpointing=gradient_checkpointing
    )
    module.configure_model() if "AdaLora" not in adapter["class_path"] else None
    trainer = quiet_trainer(tmp_path, max_steps=4, limit_val_batches=1)
    data = token_batches()
    trainer.fit(module, train_dataloaders=data, val_dataloaders=data)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train_loss"]) and torch.isfinite(metrics["val_ppl"])


def test_adalora_without_a_step_count_is_refused(tiny_model_dir):
    module = make_module(tiny_model_dir, adapter={"class_path": "AdaLoraConfig"})
    with pytest.raises(ConfigError, match="AdaLoRA needs the number of training steps"):
        module.configure_model()


def test_validation_logs_loss_perplexity_and_accuracy(tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir)
    trainer = quiet_trainer(tmp_path)
    data = token_batches(n_batches=2)
    (result,) = trainer.validate(module, dataloaders=data)
    assert result["val_ppl"] == pytest.approx(torch.exp(torch.tensor(result["val_loss"])).item(), rel=1e-5)
    assert 0 <= result["val_acc"] <= 1
    assert result["val_loss"] == pytest.approx(module.evaluate(data)["loss"], rel=1e-5)


def test_packing_isolation_check(tiny_model_dir):
    lora = make_module(tiny_model_dir)
    lora.configure_model()
    lora.check_packing_isolation()  # LoRA on sdpa keeps packed examples apart
    prompt = make_module(
        tiny_model_dir, adapter={"class_path": "PromptTuningConfig", "init_args": {"num_virtual_tokens": 2}}
    )
    prompt.configure_model()
    message = (
        r"^`data.packing: true` is not safe with LlamaForCausalLM .*PromptTuningConfig\).* `data.packing: false`\.$"
    )
    with pytest.raises(ConfigError, match=message):
        prompt.check_packing_isolation()


def test_generate_answers_a_chat_prompt(tiny_model_dir):
    module = make_module(tiny_model_dir)
    text = module.generate("hello", max_new_tokens=5)
    assert isinstance(text, str)
    assert module.model.training, "generate must restore the training mode"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"learning_rate": 0.0, "warmup_ratio": 1.5},
            r"`learning_rate`=0.0 must be > 0; `warmup_ratio`=1.5 must be in",
        ),
        ({"weight_decay": -1.0}, r"`weight_decay`=-1.0 must be >= 0"),
        ({"quantization": "3bit"}, r"`quantization`='3bit' must be one of none, 8bit, 4bit"),
    ],
)
def test_invalid_settings_fail_at_construction(tiny_model_dir, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_module(tiny_model_dir, **kwargs)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"])
def test_optimizers_step(tiny_model_dir, tmp_path, optimizer):
    module = make_module(tiny_model_dir, optimizer=optimizer, learning_rate=1e-2, warmup_steps=1)
    module.configure_model()
    before = adapter_tensors(module)
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(module, train_dataloaders=token_batches())
    expected = {
        "adamw": "AdamW",
        "adamw_8bit": "AdamW8bit",
        "paged_adamw": "PagedAdamW",
        "paged_adamw_8bit": "PagedAdamW8bit",
    }
    assert type(trainer.optimizers[0]).__name__ == expected[optimizer]
    assert any(not torch.equal(before[k], v) for k, v in adapter_tensors(module).items())


def test_precision_auto_is_fp32_on_cpu():
    assert auto_precision() == ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    assert dtype_for_precision("bf16-mixed") == torch.bfloat16
    assert dtype_for_precision("16-mixed") == torch.float16
    assert dtype_for_precision("32-true") == torch.float32


def test_adapter_path_starts_from_a_saved_adapter(tiny_model_dir, tmp_path):
    trained = make_module(tiny_model_dir, learning_rate=1e-2, save_adapter_on_fit_end=True)
    quiet_trainer(tmp_path, max_steps=2).fit(trained, train_dataloaders=token_batches())
    loaded = make_module(
        tiny_model_dir, adapter=None, adapter_path=str(tmp_path / "lightning_logs" / "version_0" / "adapter")
    )
    loaded.configure_model()
    assert adapter_tensors(loaded).keys() == adapter_tensors(trained).keys()
    for key, value in adapter_tensors(trained).items():
        assert torch.equal(adapter_tensors(loaded)[key], value), key
    assert any(p.requires_grad for p in loaded.model.parameters()), "a loaded adapter must stay trainable"


def test_adapter_path_and_adapter_together_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="`adapter` and `adapter_path`=.* were both given"):
        make_module(tiny_model_dir, adapter={"r": 2}, adapter_path=str(tmp_path))
    with pytest.raises(ConfigError, match="is not a PEFT adapter folder"):
        make_module(tiny_model_dir, adapter=None, adapter_path=str(tmp_path))


def test_a_package_refuses_a_base_it_was_not_trained_on(tiny_model_dir, tmp_path):
    from hub_server import make_adapter
    from tiny import save_tiny_model

    from lightning_peft.hub import PackageSpec, package_adapter

    adapter = make_adapter(tmp_path / "adapter", tiny_model_dir)
    package = package_adapter(adapter, tmp_path / "package", PackageSpec(name="acme/tiny", version="1.0.0"))
    other_base = save_tiny_model(tmp_path / "other-base", seed=1)
    module = make_module(other_base, adapter=None, adapter_path=str(package.path))
    with pytest.raises(ConfigError, match="is not the one this adapter was trained on"):
        module.configure_model()
    forced = make_module(other_base, adapter=None, adapter_path=str(package.path), allow_base_mismatch=True)
    forced.configure_model()
    make_module(tiny_model_dir, adapter=None, adapter_path=str(package.path)).configure_model()


def test_run_summary_counts_steps_and_tokens(tiny_model_dir, tmp_path):
    import json

    from lightning_peft.callbacks import RunSummary

    data = token_batches(n_batches=3, batch_size=2, length=10)
    trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=[RunSummary()])
    trainer.fit(make_module(tiny_model_dir), train_dataloaders=data)
    summary = json.loads((tmp_path / "lightning_logs" / "version_0" / "run_summary.json").read_text())
    assert summary["steps"] == 3
    assert summary["tokens"] == 3 * 2 * 10 and summary["supervised_tokens"] == 3 * 2 * 9
    assert summary["duration_s"] > 0 and "CPU" in summary["hardware"]
