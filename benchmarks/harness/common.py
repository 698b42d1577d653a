"""Settings shared by the systems that are not lightning-peft: the same model load, adapter and optimizer.

Every system trains LoRA r=16, alpha=32, no dropout, on every linear layer but the LM head (PEFT's
"all-linear"), with AdamW (no weight decay, no gradient clipping: lightning-peft's defaults) and a cosine
schedule without warmup over one epoch, from the same seed. QLoRA is NF4 with double quantization, computing in
the training dtype. These are plain transformers/PEFT calls, as a user of those libraries would write them.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def dtype(spec: dict[str, Any]) -> torch.dtype:
    """The dtype of the frozen weights: bf16 for bf16 runs (GPU), fp32 otherwise."""
    return torch.bfloat16 if spec["precision"] == "bf16" else torch.float32


def load_base(spec: dict[str, Any]) -> torch.nn.Module:
    """The base model from the prepared folder, 4-bit when the system is QLoRA, on the run's device."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": dtype(spec), "attn_implementation": "sdpa"}
    if spec["quantization"] == "4bit":
        from lightning_peft.bnb_cpu import correct_cpu_dequantize_4bit

        correct_cpu_dequantize_4bit()  # every system computes with the same (exact) 4-bit weights
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype(spec),
        )
        kwargs["device_map"] = {"": 0 if spec["device"] == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], **kwargs)
    if spec["quantization"] == "none":
        model = model.to(spec["device"])
    return model


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", **LORA)


def peft_model(spec: dict[str, Any]) -> torch.nn.Module:
    """Base + LoRA, k-bit prepared for QLoRA, in training mode."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = load_base(spec)
    if spec["quantization"] == "4bit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, lora_config())
    model.train()
    return model


def load_plan(spec: dict[str, Any]) -> dict[str, Any]:
    """The batches and examples the orchestrator prepared (a trusted file it wrote itself)."""
    with Path(spec["plan_file"]).open("rb") as handle:
        return pickle.load(handle)


def autocast(spec: dict[str, Any]) -> Any:
    """bf16 autocast for bf16 runs (LoRA weights stay fp32, as PEFT makes them), a no-op otherwise."""
    return torch.autocast(spec["device"], dtype=torch.bfloat16, enabled=spec["precision"] == "bf16")
