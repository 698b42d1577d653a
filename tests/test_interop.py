"""Adapters cross the border both ways: plain PEFT in, plain PEFT out.

- An adapter trained by a plain PEFT loop (no lightning-peft) loads in `PeftCausalLM(adapter_path=...)` with the
  logits PEFT gives it, generates what PEFT generates, and is published, pulled back and loaded again.
- An adapter trained by lightning-peft loads with `PeftModel.from_pretrained` and with
  `AutoPeftModelForCausalLM.from_pretrained` (which finds the base from adapter_config.json) with bit-identical
  logits, for LoRA, DoRA and IA3. (test_module.py has the PeftModel case for LoRA alone.)
"""

from __future__ import annotations

import pytest
import torch
from helpers import quiet_trainer, token_batches
from hub_server import lpeft
from peft import AutoPeftModelForCausalLM, IA3Config, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_peft import PeftCausalLM

IDS = torch.tensor([[5, 9, 11, 40, 7, 3, 90], [12, 4, 4, 8, 60, 2, 33]])


def logits(model, ids=IDS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def train_with_plain_peft(base_dir, folder, config, steps: int = 3):
    """What a PEFT user without lightning-peft does: get_peft_model, a few AdamW steps, save_pretrained."""
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for batch in token_batches(n_batches=steps):
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    return model


def reference_generation(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy generation with plain transformers/PEFT, rendered the way a chat model is prompted."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    model.eval()
    with torch.no_grad():
        out = model.generate(
            **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        IA3Config(task_type="CAUSAL_LM"),
    ],
    ids=["lora", "ia3"],
)
def test_a_plain_peft_adapter_loads_and_generates_like_peft(config, tiny_model_dir, tmp_path):
    trained = train_with_plain_peft(tiny_model_dir, tmp_path / "plain", config)
    assert not (tmp_path / "plain" / "tokenizer.json").exists()  # plain PEFT saves no tokenizer
    module = PeftCausalLM(str(tiny_model_dir), adapter_path=str(tmp_path / "plain"))
    module.configure_model()
    assert torch.equal(logits(module.model), logits(trained))
    assert not torch.equal(logits(module.model), logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir)))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    generated = module.generate("What is 2 + 2?", max_new_tokens=6)
    assert generated and generated == reference_generation(trained, tokenizer, "What is 2 + 2?", 6)


def test_a_plain_peft_adapter_is_published_pulled_and_loaded(tiny_model_dir, tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trained = train_with_plain_peft(tiny_model_dir, tmp_path / "run" / "adapter", config)
    registry = tmp_path / "registry"
    # publish reloads the package onto the base and compares logits before anything is published.
    result = lpeft("publish", tmp_path / "run" / "adapter", "acme/plain-peft", "--registry", registry, "-m", "plain")
    assert result.exit_code == 0, result.output
    assert "Published acme/plain-peft 1.0.0" in result.stdout
    result = lpeft(
        "pull", "acme/plain-peft@^1", "--to", tmp_path / "pulled", "--registry", registry, "--base", tiny_model_dir
    )
    assert result.exit_code == 0 and "base fingerprint matches" in result.stdout, result.output
    assert lpeft("inspect", tmp_path / "pulled", "--serving", "vllm").stdout.startswith("vLLM: loadable")
    module = PeftCausalLM(str(tiny_model_dir), adapter_path=str(tmp_path / "pulled"))  # checks the fingerprint
    module.configure_model()
    assert torch.equal(logits(module.model), logits(trained))


@pytest.mark.parametrize(
    "adapter",
    [
        {"r": 4, "lora_dropout": 0.1},
        {"r": 4, "use_dora": True},
        {"class_path": "peft.IA3Config", "init_args": {}},
    ],
    ids=["lora", "dora", "ia3"],
)
def test_our_adapter_loads_with_peft_and_auto_peft_identically(adapter, tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    module = PeftCausalLM(str(tiny_model_dir), adapter=adapter, learning_rate=5e-2, lr_scheduler="constant")
    quiet_trainer(tmp_path, max_steps=2).fit(module, train_dataloaders=token_batches())
    folder = module.final_adapter_dir
    assert (folder / "adapter_config.json").is_file()
    ours = logits(module.model)
    # The in-memory adapter was trained: it no longer gives the base's logits.
    assert not torch.equal(ours, logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir)))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)
    auto = AutoPeftModelForCausalLM.from_pretrained(folder)  # the base comes from adapter_config.json alone
    assert torch.equal(logits(peft_model), ours)
    assert torch.equal(logits(auto), ours)
