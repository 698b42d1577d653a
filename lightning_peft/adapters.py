"""PEFT configuration, injection and adapter I/O. No Lightning here: everything is testable without a Trainer.

A plain mapping means `peft.LoraConfig`; a mapping with `class_path`/`init_args` (what LightningCLI writes) or a
`peft.PeftConfig` instance selects any other method. Saved adapters are plain PEFT folders.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_peft.atomic import staged_folder
from lightning_peft.errors import ConfigError
from lightning_peft.files import check_files, check_folder, read_json_object
from lightning_peft.models import linear_module_names, portable_base_name, resolve_model
from lightning_peft.options import GradientCheckpointing

if TYPE_CHECKING:
    import torch
    from peft import PeftConfig, PeftModel

log = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES = "all-linear"
# PEFT's own per-architecture defaults are right for these (IA3 must pair targets with feed-forward modules).
_KEEP_PEFT_DEFAULT_TARGETS = {"IA3"}


def build_peft_config(adapter: PeftConfig | dict[str, Any] | None) -> PeftConfig:
    """Turn the `adapter` setting into a `PeftConfig` for causal LMs, with `target_modules` defaulting to all-linear.

    Args:
        adapter: None (LoRA with PEFT's defaults), a mapping of `LoraConfig` fields, a mapping with
            `class_path` (e.g. "peft.AdaLoraConfig" or "IA3Config") and `init_args`, or a `PeftConfig`.

    Raises:
        ConfigError: unknown class or fields, or values PEFT rejects.
    """
    from peft import LoraConfig, PeftConfig

    if isinstance(adapter, PeftConfig):
        config = dataclasses.replace(adapter)
    elif adapter is None or isinstance(adapter, dict):
        adapter = dict(adapter or {})
        if "class_path" in adapter:
            config = _instantiate(_config_class(adapter.pop("class_path")), adapter.pop("init_args", None) or {})
            if adapter:
                raise ConfigError(
                    f"`adapter` has keys {sorted(adapter)} beside class_path/init_args; move them into init_args."
                )
        else:
            config = _instantiate(LoraConfig, adapter)
    else:
        raise ConfigError(
            f"`adapter` must be a mapping of LoraConfig fields, class_path/init_args or a peft config, got {type(adapter).__name__}."
        )
    if config.task_type is None:
        config.task_type = "CAUSAL_LM"
    if getattr(config, "tokenizer_name_or_path", None):  # prompt tuning's TEXT init loads this tokenizer itself
        config.tokenizer_name_or_path = resolve_model(config.tokenizer_name_or_path)
    if getattr(config, "target_modules", "absent") is None and _peft_type(config) not in _KEEP_PEFT_DEFAULT_TARGETS:
        config.target_modules = DEFAULT_TARGET_MODULES
    return config


def _config_class(class_path: str) -> type:
    import peft

    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name) if module_name else getattr(peft, name)
    except (ImportError, AttributeError):
        known = ", ".join(n for n in dir(peft) if n.endswith("Config") and n != "PeftConfig")
        raise ConfigError(
            f"`adapter.class_path`={class_path!r} is not a peft config class; use one of: {known}."
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, peft.PeftConfig)):
        raise ConfigError(f"`adapter.class_path`={class_path!r} is not a subclass of peft.PeftConfig.")
    return cls


def _instantiate(cls: type, kwargs: dict[str, Any]) -> PeftConfig:
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ConfigError(
            f"`adapter` has fields {unknown} that {cls.__name__} does not know; valid fields: {', '.join(sorted(fields))}."
        )
    # AdaLoRA refuses a config without `total_step`; `fill_total_step` takes it from `trainer.max_steps` later.
    defer_total_step = is_adalora(cls.__name__) and kwargs.get("total_step") is None
    try:
        config = cls(**{**kwargs, "total_step": 10**9}) if defer_total_step else cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"`adapter` ({cls.__name__}) is invalid: {err}") from err
    if defer_total_step:
        config.total_step = None
    return config


def is_adalora(class_path: str) -> bool:
    """Whether `class_path` ("AdaLoraConfig", "peft.AdaLoraConfig" ...) names AdaLoRA's config."""
    return str(class_path).rsplit(".", 1)[-1] == "AdaLoraConfig"


def adalora_total_step(max_steps: int | None, *, option: str = "adapter.init_args.total_step") -> int:
    """AdaLoRA's schedule length when its config leaves `total_step` unset: the trainer's `max_steps`.

    Raises:
        ConfigError: `max_steps` is not set either (`option` names the setting in the message).
    """
    if max_steps is not None and max_steps > 0:
        return max_steps
    raise ConfigError(f"AdaLoRA needs the number of training steps: set `{option}` or `trainer.max_steps`.")


def fill_total_step(config: PeftConfig, max_steps: int | None) -> PeftConfig:
    """`config` with AdaLoRA's unset `total_step` filled from `max_steps` (and checked again by PEFT); others as
    they are."""
    if getattr(config, "total_step", "absent") is not None:
        return config
    total_step = adalora_total_step(max_steps)
    try:
        return dataclasses.replace(config, total_step=total_step)
    except ValueError as err:
        raise ConfigError(f"`adapter` ({type(config).__name__}) with total_step={total_step}: {err}") from err


def _peft_type(config: PeftConfig) -> str:
    peft_type = config.peft_type
    return peft_type.value if isinstance(peft_type, enum.Enum) else str(peft_type)


def is_prompt_learning(config: PeftConfig) -> bool:
    return bool(getattr(config, "is_prompt_learning", False))


def config_to_dict(config: PeftConfig) -> dict[str, Any]:
    """A JSON-safe `class_path`/`init_args` mapping that `build_peft_config` turns back into the same config."""
    init_args = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.init and field.name not in ("peft_type", "peft_version") and value != _default(field):
            init_args[field.name] = _jsonable(value)
    return {"class_path": f"peft.{type(config).__name__}", "init_args": init_args}


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return _jsonable(dataclasses.asdict(value))
    return value


def check_targets(model: torch.nn.Module, config: PeftConfig) -> None:
    """Fail before training when `target_modules` names something the model does not have.

    PEFT only errors when *no* target matches; a typo beside a valid name would be dropped silently.
    """
    targets = getattr(config, "target_modules", None)
    if targets is None or targets == DEFAULT_TARGET_MODULES:
        return
    module_names = [name for name, _ in model.named_modules() if name]
    if isinstance(targets, str):
        missing = [] if any(re.fullmatch(targets, name) for name in module_names) else [targets]
    else:
        missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in module_names)]
    if missing:
        raise ConfigError(
            f"`adapter.target_modules` {missing} match no module of the model; its linear layers are: "
            f"{', '.join(linear_module_names(model))} (or use 'all-linear')."
        )


def prepare_base(
    model: torch.nn.Module, *, quantized: bool = False, gradient_checkpointing: GradientCheckpointing = False
) -> Any:
    """Ready a frozen base for adapter training: k-bit preparation and gradient checkpointing (`checkpointing`)."""
    from peft import prepare_model_for_kbit_training

    from lightning_peft import checkpointing

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    checkpointing.enable(model, gradient_checkpointing)
    return model


def inject_adapter(
    model: torch.nn.Module,
    config: PeftConfig,
    *,
    quantized: bool = False,
    gradient_checkpointing: GradientCheckpointing = False,
) -> PeftModel:
    """Wrap `model` in a trainable `PeftModel`, preparing k-bit models and gradient checkpointing first."""
    from peft import get_peft_model

    check_targets(model, config)
    model = prepare_base(model, quantized=quantized, gradient_checkpointing=gradient_checkpointing)
    # PEFT rewrites config.target_modules and wraps the layers before it can fail: name them as they were.
    targets, model_class, layers = getattr(config, "target_modules", None), type(model).__name__, None
    if any(param.dim() == 3 for param in model.parameters()):
        layers = [name for name in linear_module_names(model) if name != "lm_head"]
    try:
        return with_portable_base(get_peft_model(model, config))
    except ValueError as err:
        refused = _PARAM_WRAPPER_REFUSAL.search(str(err))
        if refused and layers is not None:
            key = re.match(r"\w+", refused["setting"].strip())[0]
            setting = f"`adapter.{key}`={getattr(config, key, None)!r}"
            raise ConfigError(_fused_experts_message(model_class, targets, layers, setting)) from err
        if "target" in str(err).lower():
            raise ConfigError(
                f"`adapter.target_modules`={getattr(config, 'target_modules', None)!r}: {err}. The model's linear "
                f"layers are: {', '.join(linear_module_names(model))}."
            ) from err
        raise ConfigError(f"`adapter` ({type(config).__name__}) cannot be applied to this model: {err}") from err


# PEFT adapts transformers 5's fused MoE expert weights (3-D parameters) with `ParamWrapper`, which refuses
# dropout, DoRA and LoRA biases; PEFT's message names neither the setting's key nor a way out.
_PARAM_WRAPPER_REFUSAL = re.compile(r"lora\.ParamWrapper does not work with (?P<setting>[\w.!=\s]+?)\.?$")


def _fused_experts_message(model_class: str, targets: Any, layers: list[str], setting: str) -> str:
    return (
        f"{setting} cannot be used on {model_class}'s fused mixture-of-experts weights, which "
        f"`target_modules`={targets!r} adapts through PEFT's target_parameters; drop that setting, or list "
        f"`target_modules` without the experts (its linear layers: {', '.join(layers)})."
    )


def read_adapter_config(directory: str | os.PathLike) -> PeftConfig:
    """The `PeftConfig` of a saved adapter folder (reads adapter_config.json only)."""
    from peft import PeftConfig

    check_adapter_folder(Path(directory))
    return PeftConfig.from_pretrained(str(directory))


def check_adapter_folder(directory: Path) -> None:
    """Refuse what is not a readable PEFT adapter folder with safetensors weights before PEFT reads it: PEFT's own
    errors for a damaged file (SafetensorError, JSONDecodeError) name neither the file nor a fix."""
    check_folder(directory, "Adapter folder")
    if not (directory / "adapter_config.json").is_file():
        raise ConfigError(f"{directory} is not a PEFT adapter folder: adapter_config.json is missing.")
    if not (directory / "adapter_model.safetensors").is_file():
        raise ConfigError(
            f"{directory} has no adapter_model.safetensors; pickle weights (.bin) are never loaded — convert them "
            "with PEFT in a trusted environment first."
        )
    read_json_object(directory / "adapter_config.json")
    check_files(directory)


def adapter_state_keys(peft_model: torch.nn.Module, adapter_name: str = "default") -> set[str]:
    """The `state_dict` keys that make up the adapter: trainable parameters and the adapter's own buffers.

    Frozen base weights (and bitsandbytes quantization state) are excluded; PEFT puts the adapter name in
    the key of every adapter tensor (`lora_A.default.weight`, `ranknum.default`, `prompt_encoder.default...`).
    Names come from `named_parameters`/`named_buffers`, never `state_dict()`, which is a collective under FSDP1;
    FSDP1's wrapper prefixes are removed so the keys match the full state dict that Lightning saves.
    """
    marker = f".{adapter_name}."
    keys = set()
    for name, tensor in [*peft_model.named_parameters(), *peft_model.named_buffers()]:
        name = clean_wrapper_prefixes(name)
        if getattr(tensor, "requires_grad", False) or marker in name or name.endswith(f".{adapter_name}"):
            keys.add(name)
    return keys


# Module names that wrappers insert in parameter names (FSDP1, activation-checkpoint and torch.compile wrappers);
# state dicts saved through those wrappers do not have them.
_WRAPPER_PREFIXES = re.compile(r"(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def clean_wrapper_prefixes(name: str) -> str:
    """`name` without the module names that FSDP1 / checkpoint / compile wrappers insert."""
    return _WRAPPER_PREFIXES.sub("", name)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values are packed in each uint8
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def adapter_regularization(peft_model: PeftModel) -> torch.Tensor | None:
    """AdaLoRA's orthogonality penalty, which PEFT adds only when the model computes the loss itself."""
    import torch

    config = peft_model.peft_config[peft_model.active_adapter]
    weight = getattr(config, "orth_reg_weight", 0.0)
    if _peft_type(config) != "ADALORA" or weight <= 0:
        return None
    penalties = []
    for name, param in peft_model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and peft_model.active_adapter in name and param.numel():
            cov = param @ param.T if "lora_A" in name else param.T @ param
            penalties.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype)))
    return weight * torch.stack(penalties).mean() if penalties else None


def save_adapter(peft_model: PeftModel, directory: str | os.PathLike, tokenizer: Any | None = None) -> Path:
    """Write a plain PEFT adapter folder atomically: a crash never leaves a half-written `directory`.

    Returns:
        The folder holding adapter_config.json, adapter_model.safetensors and the tokenizer files.
    """
    directory = Path(directory)
    with staged_folder(directory, overwrite=True) as staging:
        peft_model.save_pretrained(staging, safe_serialization=True, **save_options(peft_model))
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return directory


def save_options(peft_model: PeftModel) -> dict[str, Any]:
    """Extra `save_pretrained` arguments: whether the whole embedding matrices go into the adapter.

    An adapter with trainable tokens saves its token rows, never the whole matrix that PEFT would save because the
    vocabulary grew (`lightning_peft.tokens`). Otherwise PEFT's "auto" asks the Hub for the base's config.json
    (the adapter names the base by its Hub id) to see whether the vocabulary was resized: at every save, offline
    too, where it warns and, behind a firewall that drops packets, waits out a timeout. When the base was loaded
    from a folder, its config.json answers instead; PEFT still decides for adapted embeddings (no lookup there).
    """
    configs = getattr(peft_model, "peft_config", {}).values()
    if any(getattr(config, "trainable_token_indices", None) for config in configs):
        return {"save_embedding_layers": False}
    resized = _vocabulary_resized(peft_model)
    if resized is None or _adapts_embeddings(peft_model):
        return {}
    return {"save_embedding_layers": resized}


def _vocabulary_resized(peft_model: PeftModel) -> bool | None:
    """Whether the base has other token rows than its config.json on disk says, or None when there is none."""
    base = peft_model.get_base_model()
    folder = getattr(base.config, "_name_or_path", "")
    if not folder:
        return None
    try:
        saved = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    vocab_size = saved.get("vocab_size") or (saved.get("text_config") or {}).get("vocab_size")
    if not isinstance(vocab_size, int):
        return None
    return base.get_input_embeddings().weight.shape[0] != vocab_size


def _adapts_embeddings(peft_model: PeftModel) -> bool:
    """Whether an adapter wraps an input embedding or the LM head (PEFT then saves them whole by itself)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    embeddings = {"embed_tokens", "lm_head"}
    return any(
        isinstance(module, BaseTunerLayer) and name.rsplit(".", 1)[-1] in embeddings
        for name, module in peft_model.named_modules()
    )


def load_adapter(base_model: torch.nn.Module, directory: str | os.PathLike, *, is_trainable: bool = False) -> PeftModel:
    """Load a PEFT adapter folder onto `base_model`, refusing pickle-only weights."""
    from peft import PeftModel

    check_adapter_folder(Path(directory))
    return with_portable_base(PeftModel.from_pretrained(base_model, directory, is_trainable=is_trainable))


def with_portable_base(peft_model: PeftModel) -> PeftModel:
    """Name the base by its Hub id in every adapter config (PEFT records the folder the base was loaded from, for
    a built-in alias this machine's cache path): every adapter written from `peft_model` then loads elsewhere."""
    for config in peft_model.peft_config.values():
        if config.base_model_name_or_path:
            config.base_model_name_or_path = portable_base_name(config.base_model_name_or_path)
    return peft_model
