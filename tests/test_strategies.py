"""Distributed presets: FSDP2 on 2 CPU processes matches a single process; FSDP1/DDP construction and checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_folder
from safetensors.torch import load_file
from tolerance import assert_close_reordered

from lightning_peft.errors import ConfigError
from lightning_peft.strategies import (
    DDP,
    FSDP1,
    FSDP2,
    check_quant_storage,
    decoder_layer_classes,
    decoder_layers,
)


def _config(
    tmp_path,
    tiny_model_dir,
    name,
    batch_size,
    strategy=None,
    devices=1,
    max_steps=3,
    checkpoints=False,
    quantization="none",
    sgd=False,
):
    # Every row has the same token count (no padding, equal weight per rank) and the 4 training rows are one
    # global batch: each step sees the whole epoch, so the sampler's split across ranks cannot change the
    # gradient, and the mean of the per-rank means equals the single process' mean.
    rows = [{"prompt": f"Q{i}: ", "completion": f"answer {i}"} for i in range(4)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = {
        "max_steps": max_steps,
        "default_root_dir": str(tmp_path / name),
        "enable_progress_bar": False,
        "logger": False,
        "enable_checkpointing": checkpoints,
        "accelerator": "cpu",
        "devices": devices,
    }
    if strategy is not None:
        trainer["strategy"] = strategy
    model = {
        "model_name_or_path": str(tiny_model_dir),
        "adapter": {"r": 4, "lora_dropout": 0.0},
        "learning_rate": 0.01,
        "lr_scheduler": "constant",
        "quantization": quantization,
    }
    if sgd:  # see helpers.SGDPeftCausalLM; gradients here are ~1e-3: a rate that moves LoRA B off zero in 3 steps
        model = {"class_path": "helpers.SGDPeftCausalLM", "init_args": {**model, "learning_rate": 1.0}}
    config = {
        "model": model,
        "data": {"train_file": str(data), "max_length": 64, "batch_size": batch_size},
        "trainer": trainer,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(config))
    return path


TESTS = str(Path(__file__).parent)


def _fit(config, *args):
    # The tests folder is importable (helpers.SGDPeftCausalLM), as a user's project folder would be.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "lightning_peft", "fit", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=env,
    )


def _adapter(root):
    return load_file(run_folder(root) / "adapter" / "adapter_model.safetensors")


def _with_chat_template(config, base_dir, tmp_path):
    """The run of `config` on chat data with `chat_template: chatml` on a base whose vocabulary lacks its tokens."""
    rows = [
        {"messages": [{"role": "user", "content": f"say {c}"}, {"role": "assistant", "content": c * 3}]} for c in "abcd"
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))  # equal token counts, as in _config
    run = json.loads(config.read_text())
    run["model"]["init_args"]["model_name_or_path"] = str(base_dir)
    run["data"].update(train_file=str(data), chat_template="chatml")
    config.write_text(json.dumps(run))
    return config


@pytest.mark.parametrize(("preset", "quantization"), [("FSDP2", "none"), ("DDP", "none"), ("FSDP2", "4bit")])
def test_two_cpu_processes_match_one_process(tmp_path, tiny_model_dir, preset, quantization):
    strategy = {"class_path": f"lightning_peft.strategies.{preset}"}
    run = {"tiny_model_dir": tiny_model_dir, "quantization": quantization, "sgd": True}
    sharded = _fit(_config(tmp_path, name="multi", batch_size=2, strategy=strategy, devices=2, **run))
    assert sharded.returncode == 0, sharded.stderr
    assert sharded.stderr.count("Adapter saved to") == 1, "one process writes the adapter"
    if preset == "FSDP2":
        assert "FSDP2: sharded 2 decoder layers of PeftModelForCausalLM and the root" in sharded.stderr
    single = _fit(_config(tmp_path, name="single", batch_size=4, **run))
    assert single.returncode == 0, single.stderr

    got, want = _adapter(tmp_path / "multi"), _adapter(tmp_path / "single")
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        assert got[key].shape == tensor.shape, f"{key} is one rank's shard, not the gathered tensor"
        # The runs differ in summation order only: the loss over 2 + 2 rows instead of 4, then the gradients'
        # all-reduce. Each step's gradient comes from sums over at most 64 terms (the MLP width; 4 rows of 12
        # tokens), about 6 in a row back to the first layer's adapter; with momentum 0.5 the 3 steps' gradients
        # enter the final adapter with weights 1.75 + 1.5 + 1 (< 5).
        assert_close_reordered(got[key], tensor, n_terms=64, sums_in_a_row=5 * 6, msg=key)
        if "lora_B" in key:
            assert tensor.abs().max() > 1e-4, "LoRA B starts at zero: training moved it"
    config = json.loads((run_folder(tmp_path / "multi") / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4


def test_fsdp2_qlora_trains_the_tokens_a_chat_template_adds(tmp_path):
    """QLoRA + FSDP2 + trainable tokens: the 2-process adapter (LoRA and the new embedding rows) matches 1 process."""
    from tiny import save_tiny_model

    base = save_tiny_model(tmp_path / "base", chat=False)
    strategy = {"class_path": "lightning_peft.strategies.FSDP2"}
    run = {"tiny_model_dir": base, "quantization": "4bit", "sgd": True}
    configs = {
        "multi": _config(tmp_path, name="multi", batch_size=2, strategy=strategy, devices=2, **run),
        "single": _config(tmp_path, name="single", batch_size=4, **run),
    }
    for config in configs.values():
        result = _fit(_with_chat_template(config, base, tmp_path))
        assert result.returncode == 0, result.stderr
        assert "training the embedding rows of the new tokens [259, 260] only" in result.stderr
    got, want = _adapter(tmp_path / "multi"), _adapter(tmp_path / "single")
    assert got.keys() == want.keys()
    deltas = [key for key in want if "trainable_tokens_delta" in key]
    assert len(deltas) == 2  # the input embeddings and the untied lm_head
    for key, tensor in want.items():
        assert got[key].shape == tensor.shape, f"{key} is one rank's shard, not the gathered tensor"
        assert_close_reordered(got[key], tensor, n_terms=64, sums_in_a_row=5 * 6, msg=key)


def test_presets_parse_from_yaml(tmp_path):
    config = tmp_path / "strategy.yaml"
    strategy = {
        "class_path": "lightning_peft.strategies.FSDP2",
        "init_args": {"param_dtype": "bfloat16", "layer_class_names": ["LlamaDecoderLayer"]},
    }
    config.write_text(json.dumps({"trainer": {"strategy": strategy}}))
    result = _fit(config, "--print_config")
    assert result.returncode == 0, result.stderr
    assert "param_dtype: bfloat16" in result.stdout


def test_fsdp2_resumes_from_its_adapter_checkpoint(tmp_path, tiny_model_dir):
    fsdp2 = {"class_path": "lightning_peft.strategies.FSDP2"}
    run = {"batch_size": 2, "strategy": fsdp2, "devices": 2, "sgd": True}
    whole = _fit(_config(tmp_path, tiny_model_dir, "whole", max_steps=4, **run))
    assert whole.returncode == 0, whole.stderr
    first = _fit(_config(tmp_path, tiny_model_dir, "parts", max_steps=2, checkpoints=True, **run))
    assert first.returncode == 0, first.stderr
    checkpoints = run_folder(tmp_path / "parts") / "checkpoints"
    (last,) = [p for p in checkpoints.iterdir() if p.name.startswith("last")]
    state = load_file(last / "adapter_model.safetensors")
    assert state.keys() == _adapter(tmp_path / "whole").keys(), "the checkpoint holds the whole adapter"
    resumed = _fit(
        _config(tmp_path, tiny_model_dir, "parts", max_steps=4, checkpoints=True, **run), "--ckpt_path", "last"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "Restored all states from the checkpoint" in resumed.stderr
    want, got = _adapter(tmp_path / "whole"), _adapter(tmp_path / "parts")
    assert any(not torch.equal(got[k], state[k]) for k in state), "training went on after the resume"
    for key, tensor in want.items():
        # The same sums in the same order, unless the BLAS picks another kernel for a buffer's alignment: the
        # bound of the comparison above, for 4 steps (weights 1.875 + 1.75 + 1.5 + 1 < 7).
        assert_close_reordered(got[key], tensor, n_terms=64, sums_in_a_row=7 * 6, msg=key)


# ---- CPU-checkable parts of the presets ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_peft_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2))


def test_decoder_layers_are_found_from_the_model(tiny_peft_model):
    (cls,) = decoder_layer_classes(tiny_peft_model)
    assert cls.__name__ == "LlamaDecoderLayer"
    assert len(decoder_layers(tiny_peft_model)) == tiny_peft_model.config.num_hidden_layers


def test_decoder_layers_fall_back_to_the_module_list():
    model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)]), torch.nn.ReLU())
    assert decoder_layer_classes(model) == {torch.nn.Linear}
    with pytest.raises(ConfigError, match="layer_class_names"):
        decoder_layer_classes(model, ["Nope"])


def test_fsdp1_wraps_each_decoder_layer(tiny_peft_model):
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    strategy = FSDP1()
    assert strategy.kwargs["use_orig_params"] is True
    policy = strategy.wrap_policy(tiny_peft_model)
    assert isinstance(policy, ModuleWrapPolicy)
    assert {c.__name__ for c in policy._module_classes} == {"LlamaDecoderLayer"}
    with pytest.raises(ConfigError, match="use_orig_params"):
        FSDP1(use_orig_params=False)
    with pytest.raises(ConfigError, match="layer_class_names"):
        FSDP1(auto_wrap_policy={torch.nn.Linear})


def test_presets_construct():
    assert DDP()._ddp_kwargs == {"find_unused_parameters": False, "gradient_as_bucket_view": True}
    fsdp2 = FSDP2(param_dtype="bfloat16", reshard_after_forward=False)
    assert fsdp2.shard_options["param_dtype"] == "bfloat16"
    with pytest.raises(ConfigError, match="torch dtype"):
        FSDP2(param_dtype="bfloat17")  # type: ignore[arg-type]


class _Module:
    def __init__(self, quantization, options, base_dtype):
        self.hparams = {"quantization": quantization, "quantization_options": options}
        self.base_dtype = base_dtype


@pytest.mark.parametrize(
    ("quantization", "options", "dtype", "ok"),
    [
        ("none", None, torch.bfloat16, True),
        ("4bit", None, torch.bfloat16, False),  # bitsandbytes' default uint8 storage
        ("4bit", {"bnb_4bit_quant_storage": "float32"}, torch.bfloat16, False),
        ("4bit", {"bnb_4bit_quant_storage": "bfloat16"}, torch.bfloat16, True),
        ("8bit", None, torch.float16, True),
    ],
)
def test_qlora_quant_storage_must_match_the_compute_dtype(quantization, options, dtype, ok):
    module = _Module(quantization, options, dtype)
    if ok:
        check_quant_storage(module)
    else:
        with pytest.raises(ConfigError, match="bnb_4bit_quant_storage: bfloat16"):
            check_quant_storage(module)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP1 needs CUDA")
def test_fsdp1_on_gpu(tmp_path, tiny_model_dir):  # pragma: no cover - GPU only
    strategy = {"class_path": "lightning_peft.strategies.FSDP1"}
    config = _config(tmp_path, tiny_model_dir, "fsdp1", batch_size=4, strategy=strategy)
    text = json.loads(config.read_text())
    text["trainer"].update(accelerator="gpu", devices=1)
    config.write_text(json.dumps(text))
    result = _fit(config)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "fsdp1" / "adapter" / "adapter_model.safetensors").is_file()


def test_fsdp1_checkpoints_keep_every_adapter_tensor(tiny_model_dir):
    """Under FSDP1 parameter names carry `_fsdp_wrapped_module.`; the saved full state dict's keys do not."""
    worker = Path(__file__).with_name("fsdp1_worker.py")
    result = subprocess.run(
        [sys.executable, str(worker), str(tiny_model_dir)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["expected"], "the reference adapter has no tensors"
    assert report["kept"] == report["expected"]
    assert report["values_equal"]
