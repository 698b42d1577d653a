"""Merging adapters into their base: `merge_adapter`, the `AdapterMerge` callback and `lpeft merge`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer, token_batches
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from lightning_peft import PeftCausalLM
from lightning_peft.adapters import build_peft_config
from lightning_peft.callbacks import AdapterMerge
from lightning_peft.errors import ConfigError, DataError
from lightning_peft.merging import REPORT_FILE, MergeVerificationError, check_merge_options, merge_adapter

REPO = Path(__file__).resolve().parents[1]
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", REPORT_FILE}


def make_adapter(base_dir, folder, adapter=None, seed=0):
    """Save an adapter whose every trainable tensor is perturbed, so that it really changes the logits."""
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), build_peft_config(adapter or {"r": 4}))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    return folder


def probe_logits(model, length=20, vocab=200):
    ids = torch.randint(3, vocab, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(ids, use_cache=False).logits


def no_leftovers(parent: Path) -> bool:
    return not [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, tmp_path_factory):
    """A few QLoRA steps on the tiny model with `AdapterMerge`; returns (trainer, callback)."""
    seed_everything(0)
    root = tmp_path_factory.mktemp("qlora-run")
    module = PeftCausalLM(
        str(tiny_model_dir), quantization="4bit", adapter={"r": 4}, learning_rate=5e-2, lr_scheduler="constant"
    )
    callback = AdapterMerge()
    trainer = quiet_trainer(root, max_steps=4, logger=CSVLogger(root), callbacks=[callback])
    trainer.fit(module, train_dataloaders=token_batches(n_batches=2))
    return trainer, callback


# ---- LoRA in fp32: merged == unmerged, a plain transformers folder, deterministic --------------------------------


def test_lora_merge_matches_the_adapter_model_and_loads_with_transformers(tiny_model_dir, lora_dir, tmp_path):
    out = tmp_path / "merged"
    report = merge_adapter(lora_dir, out)
    assert report.passed and report.max_abs_logit_diff <= 1e-4 and report.quantization == "none"
    assert {p.name for p in out.iterdir()} >= MODEL_FILES and no_leftovers(tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert (probe_logits(merged) - probe_logits(unmerged)).abs().max() <= 1e-4
    assert (probe_logits(base) - probe_logits(unmerged)).abs().max() > 1e-2  # the adapter does change the model
    saved = json.loads((out / REPORT_FILE).read_text())
    for key in ("mode", "dtype", "base", "adapter", "max_abs_logit_diff", "mean_abs_logit_diff", "tolerance"):
        assert saved[key] == getattr(report, key)
    assert saved["passed"] and saved["probe_count"] >= 4 and {"torch", "transformers", "peft"} <= set(saved["versions"])


def test_merging_the_same_adapter_twice_gives_identical_weights(lora_dir, tmp_path):
    merge_adapter(lora_dir, tmp_path / "a")
    merge_adapter(lora_dir, tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    "adapter",
    [
        {"r": 4, "use_dora": True},
        {"class_path": "peft.IA3Config", "init_args": {}},
        {"class_path": "peft.LoHaConfig", "init_args": {"r": 4}},
        {"class_path": "peft.LoKrConfig", "init_args": {"r": 4}},
        {"class_path": "peft.VeraConfig", "init_args": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
        {"class_path": "peft.AdaLoraConfig", "init_args": {"init_r": 4, "target_r": 2, "total_step": 10}},
    ],
    ids=["dora", "ia3", "loha", "lokr", "vera", "adalora"],
)
def test_every_mergeable_method_merges_within_tolerance(tiny_model_dir, tmp_path, adapter):
    folder = make_adapter(tiny_model_dir, tmp_path / "adapter", adapter)
    report = merge_adapter(folder, tmp_path / "merged")
    assert report.passed and report.max_abs_logit_diff <= 1e-4, report


def test_bfloat16_output_reports_the_rounding(lora_dir, tmp_path):
    from safetensors import safe_open

    report = merge_adapter(lora_dir, tmp_path / "merged", dtype="bfloat16")
    assert report.max_abs_logit_diff <= 1e-4 < report.saved_dtype_max_abs_logit_diff
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as weights:
        names = weights.keys()
        assert {weights.get_tensor(name).dtype for name in names} == {torch.bfloat16}


# ---- QLoRA: dequantized merge is exact, the alternatives are measurably worse ---------------------------------


def test_callback_merges_qlora_onto_the_dequantized_weights(qlora_run, tiny_model_dir):
    trainer, callback = qlora_run
    log_dir = Path(trainer.log_dir)
    merged = log_dir / "merged"
    assert {p.name for p in log_dir.iterdir()} == {"adapter", "merged", "hparams.yaml", "metrics.csv"}
    assert {p.name for p in merged.iterdir()} == MODEL_FILES | {"tokenizer_config.json", "chat_template.jinja"}
    report = json.loads((merged / REPORT_FILE).read_text())
    assert report == callback.report.to_dict()
    assert report["quantization"] == "4bit" and report["mode"] == "dequantized" and report["passed"]
    assert report["max_abs_logit_diff"] <= 1e-4
    shift = {mode: v["max_abs_logit_diff"] for mode, v in report["shift_from_trained"].items()}
    # Dequantized is the model as trained; the original weights and PEFT's requantizing merge both move it.
    assert shift["dequantized"] <= 1e-4 < 1e-2 < shift["original"] < shift["quantized"], shift
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    # The folder is what `AutoModelForCausalLM` loads, and it is the trained QLoRA model.
    from lightning_peft.models import load_base_model

    trained = PeftModel.from_pretrained(load_base_model(str(tiny_model_dir), quantization="4bit"), log_dir / "adapter")
    assert (probe_logits(AutoModelForCausalLM.from_pretrained(merged)) - probe_logits(trained)).abs().max() <= 1e-4


def test_callback_merges_the_in_memory_adapter_when_the_module_saves_none(tiny_model_dir, tmp_path):
    module = PeftCausalLM(str(tiny_model_dir), adapter={"r": 2}, learning_rate=1e-2, save_adapter_on_fit_end=False)
    callback = AdapterMerge(dirpath=str(tmp_path / "merged"))
    quiet_trainer(tmp_path, max_steps=1, callbacks=[callback]).fit(module, train_dataloaders=token_batches(1))
    assert callback.report.passed and callback.report.max_abs_logit_diff <= 1e-4
    assert {p.name for p in tmp_path.iterdir()} == {"merged"}  # the temporary adapter folder is gone


def test_8bit_dequantized_merge_beats_the_requantizing_one(tiny_model_dir, lora_dir, tmp_path):
    report = merge_adapter(lora_dir, tmp_path / "merged", quantization="8bit")
    shift = {mode: v["max_abs_logit_diff"] for mode, v in report.shift_from_trained.items()}
    assert report.passed and report.max_abs_logit_diff <= 1e-4
    assert shift["dequantized"] < shift["quantized"], shift


# ---- failures: a clear error and no output folder -------------------------------------------------------------


def test_tolerance_the_merge_cannot_meet_writes_nothing(lora_dir, tmp_path):
    with pytest.raises(MergeVerificationError, match=r"max abs logit diff .* > tolerance 0 .*nothing was written"):
        merge_adapter(lora_dir, tmp_path / "merged", tolerance=0)
    assert not (tmp_path / "merged").exists() and no_leftovers(tmp_path)


def test_nan_in_the_merged_model_writes_nothing(lora_dir, tmp_path, monkeypatch):
    import lightning_peft.merging.job as merging_job

    real_merge = merging_job._merge

    def poisoned(*args):
        model = real_merge(*args)
        model.model.layers[0].mlp.up_proj.weight.data[0, 0] = float("nan")
        return model

    monkeypatch.setattr(merging_job, "_merge", poisoned)
    with pytest.raises(MergeVerificationError, match="NaN/Inf"):
        merge_adapter(lora_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and no_leftovers(tmp_path)


def test_existing_out_is_refused_without_force(lora_dir, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="already exists and is not empty.*--overwrite"):
        merge_adapter(lora_dir, out)
    assert (out / "keep.txt").exists()
    merge_adapter(lora_dir, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists() and no_leftovers(tmp_path)
    with pytest.raises(ConfigError, match="would replace"):
        merge_adapter(lora_dir, lora_dir, force=True)


def test_prompt_learning_adapters_are_refused(tiny_model_dir, tmp_path):
    adapter = {"class_path": "peft.PromptTuningConfig", "init_args": {"num_virtual_tokens": 2}}
    folder = make_adapter(tiny_model_dir, tmp_path / "adapter", adapter)
    with pytest.raises(ConfigError, match="PROMPT_TUNING.*nothing to merge"):
        merge_adapter(folder, tmp_path / "merged")
    module = PeftCausalLM(str(tiny_model_dir), adapter=adapter)
    with pytest.raises(ConfigError, match="AdapterMerge cannot merge a PromptTuningConfig"):
        AdapterMerge().setup(quiet_trainer(tmp_path), module, "fit")


def test_callback_refuses_an_existing_dirpath_before_training(tiny_model_dir, tmp_path):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "model.safetensors").write_text("older merge")
    module = PeftCausalLM(str(tiny_model_dir), adapter={"r": 2})
    with pytest.raises(ConfigError, match="already exists and is not empty.*overwrite"):
        AdapterMerge(dirpath=str(tmp_path / "merged")).setup(quiet_trainer(tmp_path), module, "fit")
    AdapterMerge(dirpath=str(tmp_path / "merged"), overwrite=True).setup(quiet_trainer(tmp_path), module, "fit")


def test_quantization_is_read_from_the_run_files(tmp_path):
    from lightning_peft.merging.run_settings import training_quantization

    cli_config = "model:\n  class_path: lightning_peft.PeftCausalLM\n  init_args:\n    quantization: 8bit\n"
    (tmp_path / "config.yaml").write_text(cli_config)
    assert training_quantization(tmp_path / "adapter", None, None)[:2] == ("8bit", None)
    (tmp_path / "hparams.yaml").write_text(
        "adapter: !!python/object:peft.LoraConfig {r: 2}\nquantization: 4bit\n"
        "quantization_options: {bnb_4bit_quant_type: fp4}\n"
    )
    assert training_quantization(tmp_path / "adapter", None, None)[:2] == ("4bit", {"bnb_4bit_quant_type": "fp4"})
    assert training_quantization(tmp_path / "adapter", "none", None) == ("none", None, "argument")


def test_one_reader_for_the_run_yaml_files(tmp_path):
    from lightning_peft.hub.runinfo import read_run
    from lightning_peft.merging.run_settings import training_quantization
    from lightning_peft.run_files import read_run_yaml

    (tmp_path / "hparams.yaml").write_text("adapter: !!python/object:peft.LoraConfig {r: 2}\nquantization: 8bit\n")
    assert read_run_yaml(tmp_path / "hparams.yaml") == {"adapter": None, "quantization": "8bit"}
    (tmp_path / "hparams.yaml").write_text("quantization: [8bit\n")
    with pytest.raises(DataError, match=r"hparams.yaml is not valid YAML"):
        read_run_yaml(tmp_path / "hparams.yaml")
    with pytest.raises(DataError, match=r"hparams.yaml is not valid YAML"):
        read_run(tmp_path / "adapter")  # publishing says the file is damaged
    # merging reads what it can: a damaged file tells it nothing, and the default applies
    assert training_quantization(tmp_path / "adapter", None, None) == ("none", None, "default")


def test_settings_are_checked_all_at_once():
    with pytest.raises(ConfigError, match=r"`mode`='merged'.*`dtype`='int8'.*`tolerance`=-1"):
        check_merge_options(mode="merged", dtype="int8", tolerance=-1)
    with pytest.raises(ConfigError, match="`mode`"):
        AdapterMerge(mode="fast")


# ---- the command line ----------------------------------------------------------------------------------------


def lpeft(*args):
    return subprocess.run(
        [sys.executable, "-m", "lightning_peft", "merge", *map(str, args)], capture_output=True, text=True, cwd=REPO
    )


def test_cli_merges_a_qlora_run_reading_its_quantization(qlora_run, tmp_path):
    trainer, _ = qlora_run
    adapter_dir = Path(trainer.log_dir) / "adapter"
    result = lpeft(adapter_dir, "--out", tmp_path / "merged", "--no-compare-modes")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "merged")
    report = json.loads((tmp_path / "merged" / REPORT_FILE).read_text())
    assert report["quantization"] == "4bit" and report["quantization_source"].endswith("hparams.yaml")
    assert report["passed"] and list(report["shift_from_trained"]) == ["dequantized"]

    failed = lpeft(adapter_dir, "--out", tmp_path / "lossy", "--mode", "quantized", "--no-compare-modes")
    assert failed.returncode == 2, failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("lpeft: error:")]
    assert len(errors) == 1 and "requantizes" in errors[0] and "--tolerance" in errors[0], failed.stderr
    assert "Traceback" not in failed.stderr and not (tmp_path / "lossy").exists() and no_leftovers(tmp_path)
