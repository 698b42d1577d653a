"""Checks before an adapter is loaded onto a served base, or adapters are combined; no weights are read.

An adapter's tensors are matched to the base's modules from the safetensors header alone: each LoRA tensor must
name a module the base has, of the right kind, with the right number of input / output features.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_peft.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from peft import PeftConfig

_PEFT_PREFIX = "base_model.model."
_LORA_KEYS = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector(?:\.weight)?)$"
)


def module_shapes(model: torch.nn.Module) -> dict[str, tuple[str, int, int]]:
    """Module path → (kind, in, out) for the layers an adapter can target (bitsandbytes layers included)."""
    import torch

    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            shapes[name] = ("embedding", module.num_embeddings, module.embedding_dim)
        elif isinstance(getattr(module, "in_features", None), int) and isinstance(
            getattr(module, "out_features", None), int
        ):
            shapes[name] = ("linear", module.in_features, module.out_features)
        elif name:
            shapes[name] = ("other", 0, 0)
    return shapes


def check_adapter(folder: Path, shapes: dict[str, tuple[str, int, int]], *, name: str = "adapter") -> PeftConfig:
    """Check a saved adapter against a base's module shapes without loading its weights.

    Returns:
        The adapter's `PeftConfig`.

    Raises:
        ConfigError: no config or safetensors weights, not LoRA, or a tensor whose module or shape the base lacks.
    """
    from lightning_peft.adapters import read_adapter_config
    from lightning_peft.hub.fingerprint import read_safetensors_header

    config = read_adapter_config(folder)  # refuses a folder with pickle weights only
    where = f"Adapter {name!r} ({folder})"
    method = getattr(config.peft_type, "value", config.peft_type)
    if method != "LORA":
        raise ConfigError(
            f"{where} is {method}; serving many adapters on one base supports LoRA (DoRA, rsLoRA included). "
            "Merge it into its base with `lpeft merge` instead."
        )
    header, _ = read_safetensors_header(folder / "adapter_model.safetensors")
    problems = [p for key, info in header.items() if key != "__metadata__" for p in _tensor_problems(key, info, shapes)]
    if problems:
        raise ConfigError(
            f"{where} does not fit this base model: {'; '.join(problems[:3])}"
            f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}. Load it onto the base it was trained "
            f"on (its adapter_config.json names {config.base_model_name_or_path!r})."
        )
    return config


def lora_modules(folder: Path) -> set[str]:
    """The module paths that `adapter_model.safetensors` holds LoRA weights for (read from its header)."""
    from lightning_peft.hub.fingerprint import read_safetensors_header

    header, _ = read_safetensors_header(folder / "adapter_model.safetensors")
    matches = (_LORA_KEYS.match(key.removeprefix(_PEFT_PREFIX)) for key in header)
    return {match["module"] for match in matches if match}


def _tensor_problems(key: str, info: dict[str, Any], shapes: dict[str, tuple[str, int, int]]) -> list[str]:
    path = key.removeprefix(_PEFT_PREFIX)
    match = _LORA_KEYS.match(path)
    # modules_to_save copies and trainable-token rows (`token_adapter`) sit under the module they belong to.
    module = match["module"] if match else re.sub(r"\.(modules_to_save|token_adapter)\b", "", path.rsplit(".", 1)[0])
    if module not in shapes:
        return [f"tensor {key} targets {module}, which the base does not have"]
    if not match:
        return []  # modules_to_save, trainable tokens and other extras: PEFT checks their shapes when it loads them
    kind, fan_in, fan_out = shapes[module]
    shape = list(info["shape"])
    part = match["part"]
    expected = {
        "lora_A.weight": (1, fan_in),
        "lora_B.weight": (0, fan_out),
        "lora_B.bias": (0, fan_out),
        "lora_embedding_A": (1, fan_in),
        "lora_embedding_B": (0, fan_out),
    }.get(part, (0, fan_out))
    axis, size = expected
    if kind == "other" or (part.startswith("lora_embedding") != (kind == "embedding")):
        return [
            f"tensor {key} is LoRA for a {'embedding' if 'embedding' in part else 'linear'} layer but {module} is not one"
        ]
    if len(shape) <= axis or shape[axis] != size:
        side = "input" if part.endswith("A.weight") or part == "lora_embedding_A" else "output"
        return [f"{module} has {size} {side} features, the adapter's {part} has shape {shape}"]
    return []


def check_combinable(configs: list[PeftConfig], names: list[str], combination_type: str) -> None:
    """Refuse what PEFT's add_weighted_adapter silently gets wrong (huggingface/peft#3761) or cannot do."""
    for flag, why in (
        ("use_dora", "DoRA magnitude vectors are not combined"),
        ("use_rslora", "the combination would get rsLoRA scaling a second time"),
        ("lora_bias", "LoRA biases are not combined"),
    ):
        flagged = [n for n, c in zip(names, configs, strict=True) if getattr(c, flag, False)]
        if flagged:
            raise ConfigError(
                f"Adapters {flagged} (`{flag}`) cannot be combined: {why} (PEFT issue #3761). "
                "Merge them into the base one at a time instead."
            )
    ranks = {n: c.r for n, c in zip(names, configs, strict=True)}
    same_rank = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
    if combination_type in same_rank and len(set(ranks.values())) > 1:
        raise ConfigError(
            f"`combination_type`={combination_type!r} needs adapters of one rank, got {ranks}; use 'cat' or 'svd'."
        )
