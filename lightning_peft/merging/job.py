"""The merge job: what to load (settled before any model is), and the merges it computes and measures.

Each step returns what the next one needs: `plan_merge` gives the frozen `MergeJob`; its `load_tokenizer` the
tokenizer; `measure` the merged model with its probes, reference logits and differences (`Measured`); `round_to`
the difference after rounding to the saved dtype.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from lightning_peft.errors import ConfigError
from lightning_peft.merging.options import MERGE_DTYPES, MERGE_MODES
from lightning_peft.merging.probes import (
    UNMEASURED,
    Diff,
    MergeVerificationError,
    all_finite,
    diff,
    logits,
    probe_inputs,
)
from lightning_peft.merging.run_settings import training_quantization

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

COMPARE_MAX_PARAMS = 2e9  # above this, measuring every mode is no longer cheap (a float32 copy per mode)


@dataclass(frozen=True)
class MergeJob:
    """What to merge, onto which base, loaded how: checked by `plan_merge` before any model is loaded."""

    adapter_dir: Path
    out: Path
    base: str
    base_path: str
    peft_type: str
    quantization: str
    quantization_options: dict[str, Any] | None
    quantization_source: str
    revision: str | None
    trust_remote_code: bool

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        from lightning_peft.models import check_model_files

        # The run saved its tokenizer beside the adapter; a plain PEFT folder may have none.
        source = self.adapter_dir if (self.adapter_dir / "tokenizer_config.json").is_file() else self.base_path
        check_model_files(str(source))  # a damaged file is named, with the fix, before transformers fails on it
        try:
            return AutoTokenizer.from_pretrained(source, trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError) as err:
            raise ConfigError(f"No tokenizer could be loaded from {source}: {err}") from err

    def default_dtype(self) -> str:
        """The base checkpoint's own float dtype (float32 if unknown)."""
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(self.base_path, trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError):
            return "float32"
        dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
        dtype = dtype.removeprefix("torch.")
        return dtype if dtype in MERGE_DTYPES else "float32"

    def load_base(self, tokenizer: Any, quantized: bool) -> torch.nn.Module:
        """The base in float32, or quantized as in training; with rows for every token of `tokenizer`."""
        import torch

        from lightning_peft.models import load_base_model
        from lightning_peft.tokens import grow_embeddings

        options = dict(self.quantization_options or {})
        if quantized and self.quantization == "4bit":
            # The 4-bit codes do not depend on the compute dtype; float32 compute makes the trained reference exact.
            options["bnb_4bit_compute_dtype"] = torch.float32
        model = load_base_model(
            self.base_path,
            quantization=self.quantization if quantized else "none",
            quantization_options=options or None,
            dtype=torch.float32,
            revision=self.revision,
            trust_remote_code=self.trust_remote_code,
        )
        model.eval()
        # An adapter trained with tokens a chat template added holds their rows; the base needs them first.
        grow_embeddings(model, len(tokenizer))
        return model

    def with_adapter(self, model: torch.nn.Module) -> Any:
        from lightning_peft.adapters import load_adapter

        return load_adapter(model, self.adapter_dir).eval()

    def checked(self, unmerged: list[torch.Tensor]) -> list[torch.Tensor]:
        """`unmerged` (the adapter model's logits), refused when they are not finite."""
        if not all_finite(unmerged):
            raise MergeVerificationError(
                f"The adapter model itself ({self.adapter_dir} on {self.base}) gives NaN/Inf logits, so a merge "
                "cannot be verified and nothing was written; check the adapter weights and `quantization`."
            )
        return unmerged


def plan_merge(
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike,
    base: str | None,
    quantization: str | None,
    quantization_options: dict[str, Any] | None,
    revision: str | None,
    trust_remote_code: bool,
    force: bool,
) -> MergeJob:
    """Check the adapter folder, `out` and the quantization, and settle the base (see `merge_adapter`)."""
    from lightning_peft.adapters import is_prompt_learning, read_adapter_config
    from lightning_peft.models import recorded_base_source, resolve_model

    adapter_dir = Path(adapter_dir).expanduser().resolve()
    if not adapter_dir.is_dir():
        raise ConfigError(f"`adapter_dir` {adapter_dir} is not a folder; give a PEFT adapter folder.")
    config = read_adapter_config(adapter_dir)
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if is_prompt_learning(config):
        raise ConfigError(
            f"{adapter_dir} holds a {peft_type} adapter: prompt-learning methods add virtual tokens, not weight "
            "changes, so there is nothing to merge into the base; load it with peft.PeftModel instead."
        )
    base = base or recorded_base_source(config.base_model_name_or_path or "")
    if not base:
        raise ConfigError(f"{adapter_dir}/adapter_config.json names no base model; pass `base` (`--base`).")
    out = Path(out).expanduser().absolute()
    base_path = resolve_model(base)
    _check_out(out, force, protected=[adapter_dir, Path(base_path)])
    quantization, options, source = training_quantization(adapter_dir, quantization, quantization_options)
    if quantization == "none" and options:
        raise ConfigError(
            f"`quantization_options`={options!r} were given but `quantization` is 'none'; "
            "set the quantization the base was trained with (4bit or 8bit)."
        )
    return MergeJob(
        adapter_dir, out, base, base_path, peft_type, quantization, options, source, revision, trust_remote_code
    )


@dataclass(frozen=True)
class Measured:
    """The chosen mode's merged model (float32) and what was measured on the way.

    Attributes:
        merged: The merged model.
        diff: Its logits against `reference`.
        shifts: Per measured mode, how far its merged logits are from the model as trained.
        probes: The probe inputs every logit was computed on.
        reference: The chosen mode's unmerged logits (float64 compute).
    """

    merged: torch.nn.Module
    diff: Diff
    shifts: dict[str, dict[str, float | None]]
    probes: list[torch.Tensor]
    reference: list[torch.Tensor]


class _Merged(NamedTuple):
    model: torch.nn.Module
    reference: list[torch.Tensor]  # the same weights and adapter, unmerged
    logits: list[torch.Tensor]
    probes: list[torch.Tensor]


def measure(job: MergeJob, tokenizer: Any, mode: str, compare: bool | None) -> Measured:
    """Merge with `mode` (and, when comparing, the other modes); return the merged model and the numbers.

    A quantized base is loaded once: it gives the trained model's logits, the weights `dequantized` merges
    onto, and, last, PEFT's requantizing merge for `quantized`.
    """
    trained, quantized_model, probes = None, None, None
    if job.quantized:
        quantized_model = job.with_adapter(job.load_base(tokenizer, quantized=True))
        probes = _probes_for(tokenizer, quantized_model)
        trained = job.checked(logits(quantized_model, probes, exact=False))
        compare = _cheap(quantized_model) if compare is None else compare
    modes = [m for m in ("original", "dequantized", "quantized") if m == mode or (compare and job.quantized)]
    shifts, kept = {}, None
    for current in modes:
        try:
            merged = _merge_with(job, tokenizer, current, quantized_model, trained, probes)
        except ConfigError as err:
            if current == mode:
                raise
            log.warning("Mode %s could not be measured: %s", current, err)
            shifts[current] = UNMEASURED.summary()
            continue
        probes = merged.probes
        shifts[current] = diff(merged.logits, trained if trained is not None else merged.reference).summary()
        if current == mode:
            kept = Measured(merged.model, diff(merged.logits, merged.reference), {}, probes, merged.reference)
        del merged
        gc.collect()
    return dataclasses.replace(kept, shifts={m: shifts[m] for m in MERGE_MODES if m in shifts})


def _merge_with(
    job: MergeJob,
    tokenizer: Any,
    mode: str,
    quantized_model: Any,
    trained: list[torch.Tensor] | None,
    probes: list[torch.Tensor] | None,
) -> _Merged:
    """Merge with `mode` into a float32 model; return it with the unmerged and the merged logits."""
    float_model = job.load_base(tokenizer, quantized=False)
    probes = probes if probes is not None else _probes_for(tokenizer, float_model)
    if job.quantized and mode == "quantized":
        # PEFT requantizes each merged weight (this consumes the quantized model: it comes last). Its
        # unmerged counterpart is the trained model itself; the float values of the result are what is saved.
        _copy_dequantized(_merge(quantized_model, mode, job.peft_type), float_model)
        return _Merged(float_model, trained, logits(float_model, probes), probes)
    if job.quantized and mode == "dequantized":
        _copy_dequantized(quantized_model.get_base_model(), float_model)
    peft_model = job.with_adapter(float_model)
    reference = job.checked(logits(peft_model, probes))
    merged = _merge(peft_model, mode, job.peft_type)
    return _Merged(merged, reference, logits(merged, probes), probes)


def round_to(model: torch.nn.Module, dtype: str, probes: list[torch.Tensor], reference: list[torch.Tensor]) -> Diff:
    """Round the weights to `dtype` (kept in float32 storage) and measure them against `reference`."""
    import torch

    with torch.no_grad():
        for param in model.parameters():  # buffers (rotary frequencies) are rebuilt in float32 at load
            param.data = param.data.to(getattr(torch, dtype)).to(torch.float32)
    rounded = diff(logits(model, probes), reference)
    return dataclasses.replace(rounded, finite=rounded.finite and all_finite(model.parameters()))


def _probes_for(tokenizer: Any, model: torch.nn.Module) -> list[torch.Tensor]:
    return probe_inputs(tokenizer, model.get_input_embeddings().weight.shape[0])


def _check_out(out: Path, force: bool, protected: list[Path]) -> None:
    resolved = out.resolve()
    for folder in protected:
        if resolved == folder.resolve() or resolved in folder.resolve().parents:
            raise ConfigError(f"`out` {out} would replace {folder}; choose a new folder for the merged model.")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"`out` {out} exists and is not a folder; choose another path.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(
            f"`out` {out} already exists and is not empty; choose another folder or pass `force` (--overwrite) "
            "to replace it."
        )


def _cheap(model: torch.nn.Module) -> bool:
    from lightning_peft.adapters import count_parameters

    total = count_parameters(model)[1]
    if total > COMPARE_MAX_PARAMS:
        log.info(
            "Not measuring the other merge modes for a %.1fB-parameter base (pass compare_modes to force it)",
            total / 1e9,
        )
    return total <= COMPARE_MAX_PARAMS


def _copy_dequantized(quantized: torch.nn.Module, float_model: torch.nn.Module) -> int:
    """Overwrite `float_model`'s weights with the float32 values of `quantized`'s bitsandbytes weights."""
    import bitsandbytes as bnb
    import torch
    from peft.utils.integrations import dequantize_bnb_weight
    from transformers.pytorch_utils import Conv1D

    count = 0
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                weight = dequantize_bnb_weight(module.weight, getattr(module, "state", None))
                # Under a PEFT wrapper the quantized layer is `<name>.base_layer`.
                target = float_model.get_submodule(name.removesuffix(".base_layer"))
                if isinstance(target, Conv1D):  # GPT-2 stores (in, out); bitsandbytes quantized the transpose
                    weight = weight.T
                target.weight.copy_(weight.to(torch.float32))
                count += 1
    log.debug("Dequantized %d bitsandbytes weights to float32", count)
    return count


def _merge(peft_model: Any, mode: str, peft_type: str) -> torch.nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*[Mm]erge.*(rounding|quantiz)")
            return peft_model.merge_and_unload()
    except (AttributeError, NotImplementedError, ValueError, TypeError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = " (use `mode` 'dequantized')" if mode == "quantized" else ""
        raise ConfigError(f"PEFT cannot merge this {peft_type} adapter with mode {mode!r}: {first}{hint}.") from err
