"""Checks before an adapter is loaded onto a served base, or adapters are combined; no adapter weights are read.

Besides the shapes: the adapter's name, the base fingerprint a package records, and (after loading) that every
layer PEFT injected has weights in the file.

An adapter's tensors are matched to the base's modules from the safetensors header alone: each LoRA tensor must
name a module the base has, of the right kind, with the right number of input / output features. Besides linear
layers (GPT-2's `Conv1D` included) LoRA can target parameters (`target_parameters`, which PEFT's `all-linear`
uses for the fused 3-D expert weights of transformers 5 MoE blocks): PEFT then nests one `ParamWrapper` per
parameter, so its tensors sit under `<module>(.base_layer)*` and must fit one of that module's parameters.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_peft.errors import ConfigError
from lightning_peft.serving.rows import BASE

if TYPE_CHECKING:
    import torch
    from peft import PeftConfig

_PEFT_PREFIX = "base_model.model."
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_LORA_KEYS = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector(?:\.weight)?)$"
)


def module_shapes(model: torch.nn.Module) -> dict[str, tuple[str, int, int]]:
    """Path → (kind, in, out) for what an adapter can target (bitsandbytes layers included).

    Modules are keyed by their path; the matrix parameters of other modules (kind "parameter", the sizes of
    their last two axes) by `<module>.<parameter>`, since PEFT's `target_parameters` can adapt them.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            shapes[name] = ("embedding", module.num_embeddings, module.embedding_dim)
        elif isinstance(module, Conv1D):  # GPT-2: a linear layer whose weight is stored (in, out)
            shapes[name] = ("linear", module.nx, module.nf)
        elif isinstance(getattr(module, "in_features", None), int) and isinstance(
            getattr(module, "out_features", None), int
        ):
            shapes[name] = ("linear", module.in_features, module.out_features)
        elif name:
            shapes[name] = ("other", 0, 0)
            for param_name, param in module.named_parameters(recurse=False):
                if param.dim() in (2, 3):
                    shapes[f"{name}.{param_name}"] = ("parameter", *param.shape[-2:])
    return shapes


def check_adapter(folder: Path, shapes: dict[str, tuple[str, int, int]], *, name: str = "adapter") -> PeftConfig:
    """Check a saved adapter against a base's module shapes without loading its weights.

    Returns:
        The adapter's `PeftConfig`.

    Raises:
        ConfigError: no config or safetensors weights, not LoRA, or a tensor whose module or shape the base lacks.
    """
    from lightning_peft.adapters import read_adapter_config
    from lightning_peft.files import read_safetensors_header

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
    from lightning_peft.files import read_safetensors_header

    header, _ = read_safetensors_header(folder / "adapter_model.safetensors")
    matches = (_LORA_KEYS.match(key.removeprefix(_PEFT_PREFIX)) for key in header)
    return {match["module"] for match in matches if match}


def _tensor_problems(key: str, info: dict[str, Any], shapes: dict[str, tuple[str, int, int]]) -> list[str]:
    path = key.removeprefix(_PEFT_PREFIX)
    match = _LORA_KEYS.match(path)
    # modules_to_save copies and trainable-token rows (`token_adapter`) sit under the module they belong to.
    module = match["module"] if match else re.sub(r"\.(modules_to_save|token_adapter)\b", "", path.rsplit(".", 1)[0])
    if _owner(module) not in shapes:
        return [f"tensor {key} targets {module}, which the base does not have"]
    if not match:
        return []  # modules_to_save, trainable tokens and other extras: PEFT checks their shapes when it loads them
    shape = list(info["shape"])
    part = match["part"]
    if module not in shapes or shapes[module][0] == "other":
        return _parameter_problems(key, module, part, shape, shapes)
    kind, fan_in, fan_out = shapes[module]
    expected = {
        "lora_A.weight": (1, fan_in),
        "lora_B.weight": (0, fan_out),
        "lora_B.bias": (0, fan_out),
        "lora_embedding_A": (1, fan_in),
        "lora_embedding_B": (0, fan_out),
    }.get(part, (0, fan_out))
    axis, size = expected
    if part.startswith("lora_embedding") != (kind == "embedding"):
        return [
            f"tensor {key} is LoRA for a {'embedding' if 'embedding' in part else 'linear'} layer but {module} is not one"
        ]
    if len(shape) <= axis or shape[axis] != size:
        side = "input" if part.endswith("A.weight") or part == "lora_embedding_A" else "output"
        return [f"{module} has {size} {side} features, the adapter's {part} has shape {shape}"]
    return []


def _owner(module: str) -> str:
    """The base's module a LoRA tensor belongs to: nested `ParamWrapper`s add `.base_layer` to the path."""
    return re.sub(r"(\.base_layer)+$", "", module)


def _parameter_problems(
    key: str, module: str, part: str, shape: list[int], shapes: dict[str, tuple[str, int, int]]
) -> list[str]:
    """Problems of a tensor of a `target_parameters` adapter (PEFT's `ParamWrapper`) on `module`.

    Which of a module's parameters a nested wrapper adapts depends on PEFT's nesting order, so a tensor must
    fit one of them: its input (lora_A) or output (lora_B) size is one of that parameter's two matrix sizes
    (PEFT swaps them for expert weights stored (experts, out, in)).
    """
    owner = _owner(module)
    sizes = [dims for path, (kind, *dims) in shapes.items() if kind == "parameter" and path.rpartition(".")[0] == owner]
    if part not in ("lora_A.weight", "lora_B.weight") or not sizes:
        return [f"tensor {key} is LoRA for a linear layer or a matrix parameter but {owner} has none"]
    axis = 1 if part == "lora_A.weight" else 0
    if len(shape) != 2 or not any(shape[axis] in dims for dims in sizes):
        return [f"the adapter's {key} has shape {shape}, which fits none of the parameters of {owner} {sizes}"]
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


def check_new_name(name: Any, loaded: list[str]) -> None:
    """A name for a new adapter: letters, digits, '-' and '_', not 'base', not one of `loaded`."""
    if not isinstance(name, str) or not _NAME.match(name) or name in ("base", BASE):
        raise ConfigError(
            f"Adapter name {name!r} is not usable; use letters, digits, '-' and '_' ('base' means the base model)."
        )
    if name in loaded:
        raise ConfigError(f"An adapter named {name!r} is already loaded; unload it first or choose another name.")


def check_fingerprint(folder: Path, base_name: str, *, name: str, force: bool, verified: set[str]) -> None:
    """The base fingerprint a package in `folder` records against `base_name` (`hub.check_base`).

    `verified` holds the fingerprints already found to match: hashing the base's weights again would give the same
    answer. A plain PEFT folder records none and passes (its shapes were checked).
    """
    from lightning_peft.hub import check_base
    from lightning_peft.hub.manifest import MANIFEST_FILE, read

    if not (folder / MANIFEST_FILE).is_file():
        return
    recorded = read(folder).base_model.fingerprint
    if recorded in verified:
        return
    try:
        if check_base(folder, base_name, force=force):
            verified.add(recorded)
    except ConfigError as err:
        raise ConfigError(f"Adapter {name!r} ({folder}): {err}") from err


def check_complete(peft_model: Any, name: str, folder: Path) -> None:
    """Every layer PEFT gave adapter `name` must have its weights in the file; PEFT would only warn."""
    from peft.tuners.lora import LoraLayer

    injected = {
        path.removeprefix(_PEFT_PREFIX)
        for path, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and (name in module.lora_A or name in module.lora_embedding_A)
    }
    missing = sorted(injected - lora_modules(folder))
    if missing:
        raise ConfigError(
            f"Adapter {name!r} ({folder}): adapter_config.json targets {len(missing)} modules that "
            f"adapter_model.safetensors has no weights for (e.g. {missing[0]}); the file is incomplete or does "
            "not belong to this config. Save the adapter again."
        )


def check_token_rows(config: Any, loaded: dict[str, PeftConfig], *, name: str, folder: Path) -> None:
    """PEFT (0.21) cannot load an adapter without trainable tokens beside one with them, or the reverse."""
    if not loaded:
        return
    has_rows = bool(getattr(config, "trainable_token_indices", None))
    kinds = {bool(getattr(c, "trainable_token_indices", None)) for c in loaded.values()}
    if kinds != {has_rows}:
        which = "trains token rows (data.chat_template)" if has_rows else "trains no token rows"
        raise ConfigError(
            f"Adapter {name!r} ({folder}) {which}, unlike the adapters loaded ({', '.join(loaded)}); PEFT "
            "cannot hold both kinds in one model, so serve them with separate AdapterServers."
        )
