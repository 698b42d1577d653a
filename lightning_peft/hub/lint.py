"""Serving-compatibility lint of an adapter: what multi-adapter servers (vLLM) will refuse.

These follow vLLM's own checks when it loads a LoRA adapter. `PEFTHelper` (`vllm/lora/peft_helper.py`) reads
`adapter_config.json`: `r`, `lora_alpha` and `target_modules` are required, only LoRA, no `modules_to_save`, no
DoRA, no bias, and a rank within `--max-lora-rank`; it scales every module by `lora_alpha / r` (or `/ sqrt(r)`
with rsLoRA) and ignores `rank_pattern` / `alpha_pattern`. `LoRAModel.from_local_checkpoint`
(`vllm/lora/lora_model.py`) reads `adapter_model.safetensors`, else `.bin`, else `.pt`, and
`parse_fine_tuned_lora_name` (`vllm/lora/utils.py`) accepts only `lora_A.weight` / `lora_B.weight` /
`lora_embedding_A` / `lora_embedding_B` tensors (and the base embeddings). Problems are warnings when publishing:
the adapter still works with PEFT and lightning-peft, and merging it into the base serves it anywhere.
Everything here reads files only (the safetensors header, never the tensors): no torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_peft.errors import DataError
from lightning_peft.files import read_json_object, read_safetensors_header

# vLLM's default `--max-lora-rank`; larger ranks need the flag.
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_MAX_LORA_RANK = 512
# What vLLM's PEFTHelper.from_dict requires in adapter_config.json.
VLLM_REQUIRED_FIELDS = ("r", "lora_alpha", "target_modules")
# The weight files vLLM looks for, in its order.
VLLM_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
# Base embedding tensors vLLM skips (`is_base_embedding_weights`); every other tensor must be a LoRA weight.
_BASE_EMBEDDINGS = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")
_EMBEDDING_TARGETS = ("embed_tokens", "lm_head")


@dataclass
class LintReport:
    """Findings about serving an adapter.

    Attributes:
        problems: What stops vLLM from loading it as a LoRA adapter (each one line).
        notes: What the user needs to know to serve it (flags), not a problem.
        max_lora_rank: The `--max-lora-rank` vLLM needs when its default is too small.
    """

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    max_lora_rank: int | None = None

    @property
    def vllm_compatible(self) -> bool:
        return not self.problems


def lint_adapter_config(config: dict[str, Any]) -> LintReport:
    """Check an `adapter_config.json` mapping against what vLLM serves."""
    report = LintReport()
    method = str(config.get("peft_type", "?")).upper()
    if method != "LORA":
        report.problems.append(
            f"vLLM serves LoRA adapters only, and this is {method}: merge it into the base to serve it."
        )
        return report
    if config.get("modules_to_save"):
        report.problems.append(
            f"`modules_to_save`={config['modules_to_save']} fully trains those modules; vLLM refuses such adapters "
            "(it only supports modules_to_save being None)."
        )
    if config.get("use_dora"):
        report.problems.append("DoRA (`use_dora`=true) is not supported by vLLM.")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        report.problems.append(
            f"Trained biases (`bias`={config.get('bias')!r}, `lora_bias`={config.get('lora_bias')}) are not supported by vLLM."
        )
    for key in ("target_parameters", "trainable_token_indices"):
        if config.get(key):
            report.problems.append(f"`{key}` is set; vLLM loads LoRA on modules only and does not support it.")
    report.problems += _scaling_problems(config)
    rank = _max_rank(config)
    if rank > VLLM_MAX_LORA_RANK:
        report.problems.append(f"Rank {rank} exceeds vLLM's largest `--max-lora-rank` ({VLLM_MAX_LORA_RANK}).")
    elif rank > VLLM_DEFAULT_MAX_LORA_RANK:
        report.max_lora_rank = _rank_flag(rank)
        report.notes.append(f"Rank {rank} needs `--max-lora-rank {report.max_lora_rank}` in vLLM (its default is 16).")
    targets = config.get("target_modules") or []
    embeddings = [t for t in _EMBEDDING_TARGETS if t in ([targets] if isinstance(targets, str) else targets)]
    if embeddings:
        report.notes.append(
            f"LoRA on {', '.join(embeddings)} loads only for models whose vLLM class lists them in "
            "`embedding_modules` (Llama and Mistral do, Gemma does not)."
        )
    return report


def lint_adapter_dir(directory: str | os.PathLike) -> LintReport:
    """Check an adapter folder the way vLLM's LoRA loader reads it: the config, then the weights' tensor names.

    Only files are read (the safetensors header, not the tensors). A folder vLLM cannot load at all (no
    config, no weights) gives problems, not an exception.
    """
    path = Path(directory)
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        return LintReport(problems=[f"{config_path.name} is missing: vLLM reads the LoRA settings from it."])
    try:
        config = read_json_object(config_path)
    except (DataError, OSError) as err:
        return LintReport(problems=[f"{err} vLLM cannot read it."])
    report = lint_adapter_config(config)
    if str(config.get("peft_type", "?")).upper() != "LORA":
        return report
    missing = [key for key in VLLM_REQUIRED_FIELDS if key not in config]
    if missing:
        report.problems.insert(0, f"{config_path.name} lacks {', '.join(missing)}, which vLLM requires.")
    report.problems += _weights_problems(path, config, report)
    return report


def _scaling_problems(config: dict[str, Any]) -> list[str]:
    """vLLM scales every module by lora_alpha / r: a pattern that gives a module another scale is lost."""
    rank, alpha = config.get("r") or 0, config.get("lora_alpha") or 0
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if not isinstance(ranks, dict) or not isinstance(alphas, dict) or not rank:
        return []
    root = math.sqrt if config.get("use_rslora") else float
    scale = alpha / root(rank)
    changed = sorted(
        key
        for key in set(ranks) | set(alphas)
        if not math.isclose(alphas.get(key, alpha) / root(ranks.get(key, rank)), scale)
    )
    if not changed:
        return []
    return [
        f"`rank_pattern`/`alpha_pattern` give {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''} another "
        f"scale than lora_alpha/r; vLLM ignores the patterns and would scale them by {scale:g}."
    ]


def _weights_problems(path: Path, config: dict[str, Any], report: LintReport) -> list[str]:
    found = next((name for name in VLLM_WEIGHT_FILES if (path / name).is_file()), None)
    if found is None:
        return [
            f"No weights: vLLM loads {', '.join(VLLM_WEIGHT_FILES[:-1])} or {VLLM_WEIGHT_FILES[-1]}, and none is here."
        ]
    if found != VLLM_WEIGHT_FILES[0]:
        report.notes.append(
            f"vLLM reads {found} with torch.load(weights_only=True); its tensor names are not checked here "
            "(re-save the adapter with safetensors to check them)."
        )
        return []
    try:
        header, _ = read_safetensors_header(path / found)
    except (DataError, OSError) as err:
        return [f"{err} vLLM cannot load it."]
    names = [name for name in header if name != "__metadata__"]
    if not names:
        return [f"{found} holds no tensors."]
    unreadable = [name for name in names if not _vllm_reads(name) and not _explained(name, config)]
    if not unreadable:
        return []
    return [
        f"{found} holds {len(unreadable)} tensor(s) vLLM cannot parse as LoRA weights (it reads only lora_A/lora_B "
        f"and lora_embedding_A/B), e.g. {', '.join(unreadable[:2])}."
    ]


def _vllm_reads(name: str) -> bool:
    """What vLLM's `parse_fine_tuned_lora_name` accepts, plus the base embeddings it skips."""
    parts = name.split(".")
    if name.endswith(_BASE_EMBEDDINGS):
        return True
    if parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return True
    return len(parts) > 1 and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B")


def _explained(name: str, config: dict[str, Any]) -> bool:
    """A tensor the config problems already account for (DoRA magnitudes, LoRA biases, fully trained modules)."""
    if "lora_magnitude_vector" in name:
        return bool(config.get("use_dora"))
    if name.endswith(".bias") and ("lora_A" in name or "lora_B" in name):
        return bool(config.get("lora_bias") or config.get("bias", "none") != "none")
    return bool(
        config.get("modules_to_save") or config.get("trainable_token_indices") or config.get("bias", "none") != "none"
    )


def _max_rank(config: dict[str, Any]) -> int:
    ranks = [config.get("r") or 0, *(config.get("rank_pattern") or {}).values()]
    return max(int(r) for r in ranks if isinstance(r, (int, float)))


def _rank_flag(rank: int) -> int:
    """The smallest of vLLM's accepted --max-lora-rank values that fits `rank`."""
    return next(v for v in (8, 16, 32, 64, 128, 256, 320, 512) if v >= rank)
