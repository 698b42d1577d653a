"""What a model family can do here: the attention backends its class implements, and what 4/8-bit leaves float.

transformers decides per model class which attention backends it implements (`_supports_sdpa` and friends);
asking a class for one it lacks fails deep inside `from_pretrained` with a long message. These checks read only
`config.json`, so a wrong setting fails in one line before any weights are loaded.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning_peft.errors import ConfigError
from lightning_peft.options import ATTN_IMPLEMENTATIONS

log = logging.getLogger(__name__)

ATTN_AUTO = "auto"
# The class attribute transformers sets on a model class that implements each backend (eager: every class).
_SUPPORT_FLAGS = {
    "sdpa": "_supports_sdpa",
    "flex_attention": "_supports_flex_attn",
    "flash_attention_2": "_supports_flash_attn",
    "flash_attention_3": "_supports_flash_attn",
}
ATTN_SETTING = "model.attn_implementation"


def causal_lm_class(source: str, *, revision: str | None = None, trust_remote_code: bool = False) -> type | None:
    """The transformers class `AutoModelForCausalLM` builds for `source` (a folder or Hub id), from its config.

    None when it cannot be told without loading code: remote code, or a config transformers does not map.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None  # from_pretrained reports an unreachable model with the full context
    if getattr(config, "auto_map", None) and trust_remote_code:
        return None
    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return None


def supported_attn_implementations(model_class: type) -> list[str]:
    """The attention backends `model_class` implements, eager first."""
    return ["eager"] + [name for name, flag in _SUPPORT_FLAGS.items() if getattr(model_class, flag, False)]


def check_attn_implementation(requested: str | None, model_class: type | None) -> str | None:
    """The `attn_implementation` to pass to `from_pretrained`: None lets transformers pick the best one.

    transformers' own default is sdpa where the class implements it, else eager, so "auto" (or None) maps to
    None. An explicit backend the class lacks is refused here in one line instead of deep in `from_pretrained`.

    Raises:
        ConfigError: an unknown backend, or one `model_class` does not implement.
    """
    if requested in (None, ATTN_AUTO):
        return None
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(
            f"`{ATTN_SETTING}`={requested!r} is not a known attention backend; use one of "
            f"{', '.join(ATTN_IMPLEMENTATIONS)}."
        )
    if model_class is not None and requested not in (supported := supported_attn_implementations(model_class)):
        raise ConfigError(
            f"`{ATTN_SETTING}`={requested!r} is not implemented by {model_class.__name__}, which supports "
            f"{', '.join(supported)}; choose one of those or leave it unset ('auto') for the best one."
        )
    return requested


def attn_load_error(requested: str | None, err: Exception) -> ConfigError | None:
    """A one-line ConfigError for `from_pretrained`'s refusal of an attention backend, or None for other errors."""
    text = str(err).strip()
    if not requested or ("attn" not in text.lower() and "attention" not in text.lower()):
        return None
    first = text.splitlines()[0][:300]
    return ConfigError(
        f"`{ATTN_SETTING}`={requested!r} could not be used ({first}); leave it unset ('auto') or choose eager."
    )


def fused_expert_share(model: Any) -> float:
    """The share of `model`'s weights held in fused 3-D expert parameters (transformers 5 MoE blocks).

    bitsandbytes quantizes `nn.Linear` layers only, so under 4/8-bit loading these stay in the float dtype.
    """
    fused = total = 0
    for param in model.parameters():
        n = param.numel() * (2 if param.__class__.__name__ == "Params4bit" else 1)  # two 4-bit values per byte
        total += n
        if param.dim() == 3:
            fused += n
    return fused / max(total, 1)


def log_unquantized_experts(model: Any, quantization: str) -> None:
    """Say once per load how much of a quantized MoE model bitsandbytes left in full precision."""
    share = fused_expert_share(model)
    if share > 0:
        log.warning(
            "`quantization: %s` on %s: bitsandbytes quantizes linear layers only, so its fused expert weights "
            "(%.0f%% of all weights) stay in %s; LoRA adapts them through PEFT's target_parameters.",
            quantization,
            type(model).__name__,
            100 * share,
            model.dtype,
        )
