"""Serving-compatibility lint of an adapter's config: what multi-adapter servers (vLLM) will refuse.

These follow vLLM's own checks when it loads a LoRA adapter (`PEFTHelper`): only LoRA, no `modules_to_save`,
no DoRA, no bias, and a rank within `--max-lora-rank`. Problems are warnings: the adapter still works with
PEFT and lightning-peft, and merging it into the base (`merge_and_unload`) serves it anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# vLLM's default `--max-lora-rank`; larger ranks need the flag.
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_MAX_LORA_RANK = 512


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
    rank = _max_rank(config)
    if rank > VLLM_MAX_LORA_RANK:
        report.problems.append(f"Rank {rank} exceeds vLLM's largest `--max-lora-rank` ({VLLM_MAX_LORA_RANK}).")
    elif rank > VLLM_DEFAULT_MAX_LORA_RANK:
        report.max_lora_rank = _rank_flag(rank)
        report.notes.append(f"Rank {rank} needs `--max-lora-rank {report.max_lora_rank}` in vLLM (its default is 16).")
    return report


def _max_rank(config: dict[str, Any]) -> int:
    ranks = [config.get("r") or 0, *(config.get("rank_pattern") or {}).values()]
    return max(int(r) for r in ranks if isinstance(r, (int, float)))


def _rank_flag(rank: int) -> int:
    """The smallest of vLLM's accepted --max-lora-rank values that fits `rank`."""
    return next(v for v in (8, 16, 32, 64, 128, 256, 320, 512) if v >= rank)
