"""Every closed list of choices, defined once: the `Literal` a typed argument uses (so jsonargparse validates it and
`lpeft fit --help` lists it) and the tuple of its values for click choices and checks. Cheap to import: the CLI
builds its `--help` from it without torch.
"""

from __future__ import annotations

from typing import Literal, get_args

#: Base-model weight loading: full precision, or bitsandbytes 8-bit / 4-bit (QLoRA).
Quantization = Literal["none", "8bit", "4bit"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)

#: Floating-point dtypes by name (FSDP mixed precision, merged-model weights).
DtypeName = Literal["float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = get_args(DtypeName)

#: `PeftCausalLM(optimizer=...)`: torch's AdamW or bitsandbytes' 8-bit / paged variants.
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)

#: `PeftCausalLM(lr_scheduler=...)`, each after the linear warmup.
Scheduler = Literal["cosine", "linear", "constant"]
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)

#: transformers' attention backends; `auto` picks the best one the model class implements.
AttnImplementation = Literal["auto", "eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3"]
ATTN_IMPLEMENTATIONS: tuple[str, ...] = get_args(AttnImplementation)

#: The data formats; `auto` detects one from the first record's fields.
DataFormat = Literal["auto", "messages", "prompt_completion", "alpaca", "text"]
FORMATS: tuple[str, ...] = get_args(DataFormat)[1:]

#: How `lpeft merge` / `AdapterMerge` merge a quantized base (see `lightning_peft.merging`).
MergeMode = Literal["dequantized", "original", "quantized"]
MERGE_MODES: tuple[str, ...] = get_args(MergeMode)

#: The semver part `lpeft publish --bump` increments.
BumpPart = Literal["major", "minor", "patch"]
BUMP_PARTS: tuple[str, ...] = get_args(BumpPart)

#: `PeftCausalLM(gradient_checkpointing=...)`: off, every decoder layer, or the MLPs' intermediates only.
GradientCheckpointing = bool | Literal["selective"]
