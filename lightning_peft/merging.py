"""Merge a PEFT adapter into its base model and write a standard transformers folder — verified before writing.

No Lightning here: `lpeft merge` and the `AdapterMerge` callback both call `merge_adapter`.

Merge modes (they only differ when the base was quantized in training):

- `dequantized` (default): load the base quantized exactly as in training, dequantize each 4/8-bit weight to
  float32 and merge the adapter onto those — the weights the adapter was trained against.
- `original`: merge onto the original full-precision weights of the base checkpoint.
- `quantized`: PEFT's `merge_and_unload` on the quantized model, which requantizes every merged weight (lossy;
  it fails the default tolerance and is never the default).

Each merge is computed in float32 and checked on fixed probe inputs against the same weights and adapter,
unmerged (the `reference`; `tolerance` gates the difference). The check runs the forward passes in float64, so
that float32's own rounding (about 1e-4 on a 135M model's logits, merged or not) neither hides nor fakes a
difference. For a quantized base, how far each mode moves the logits from the model as trained (quantized
base + adapter) is reported too. Nothing is written unless the check passes: the folder is staged next to `out`
and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lightning_peft.atomic import staged_folder
from lightning_peft.errors import ConfigError
from lightning_peft.models import QUANTIZATIONS

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

log = logging.getLogger(__name__)

MergeMode = Literal["dequantized", "original", "quantized"]
MERGE_MODES: tuple[str, ...] = ("dequantized", "original", "quantized")
MergeDtype = Literal["float32", "bfloat16", "float16"]
MERGE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
DEFAULT_TOLERANCE = 1e-4
REPORT_FILE = "merge_report.json"
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. 1 2 3 4 5",
    "def merge(weights, delta):\n    return weights + delta\n",
)
PROBE_CHAT = "What is the capital of France? Answer in one word."
PROBE_RANDOM = 2  # sequences of random token ids
PROBE_LENGTH = 48  # tokens per probe, at most
PROBE_SEED = 0
COMPARE_MAX_PARAMS = 2e9  # above this, measuring every mode is no longer cheap (a float32 copy per mode)


class MergeVerificationError(ConfigError):
    """The merged model does not reproduce the adapter model's logits (or has NaN/Inf); nothing was written."""


@dataclass
class MergeReport:
    """What `merge_adapter` did and measured; written as `merge_report.json` beside the weights.

    `max_abs_logit_diff`/`mean_abs_logit_diff` compare the float32 merge with its `reference` (float64 forward
    passes) and are what `tolerance` gates; `saved_dtype_*` do the same for the weights rounded to `dtype`.
    `shift_from_trained` gives, per mode, how far the merged logits are from the model as trained.
    """

    mode: str
    dtype: str
    base: str
    base_path: str
    adapter: str
    peft_type: str
    quantization: str
    quantization_options: dict[str, Any] | None
    quantization_source: str
    reference: str
    trained_reference: str
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    saved_dtype_max_abs_logit_diff: float | None
    saved_dtype_mean_abs_logit_diff: float | None
    tolerance: float
    passed: bool
    probe_count: int
    probe_tokens: int
    shift_from_trained: dict[str, dict[str, float | None]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    output: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_merge_options(
    mode: str = "dequantized", dtype: str | None = None, tolerance: float | None = None, quantization: str | None = None
) -> None:
    """Validate merge settings, reporting every problem at once (used before any model is loaded)."""
    problems = []
    if mode not in MERGE_MODES:
        problems.append(f"`mode`={mode!r} is not one of {', '.join(MERGE_MODES)}")
    if dtype is not None and dtype not in MERGE_DTYPES:
        problems.append(f"`dtype`={dtype!r} is not one of {', '.join(MERGE_DTYPES)} (or leave it unset)")
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        problems.append(f"`tolerance`={tolerance!r} must be a number >= 0")
    if quantization is not None and quantization not in QUANTIZATIONS:
        problems.append(f"`quantization`={quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    if problems:
        raise ConfigError("; ".join(problems) + ".")


def merge_adapter(
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    base: str | None = None,
    quantization: str | None = None,
    quantization_options: dict[str, Any] | None = None,
    mode: MergeMode = "dequantized",
    dtype: MergeDtype | None = None,
    tolerance: float | None = None,
    max_shard_size: str | int = "2GB",
    force: bool = False,
    compare_modes: bool | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> MergeReport:
    """Merge the adapter in `adapter_dir` into its base and write a transformers model folder to `out`.

    Args:
        adapter_dir: A plain PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
        out: The folder to write (safetensors shards, config.json, generation_config.json, tokenizer files and
            merge_report.json). It must not exist (an empty folder is fine) unless `force`.
        base: The base model (alias, folder or Hub id); default: the adapter config's `base_model_name_or_path`.
        quantization: How the base was loaded in training: `none`, `4bit` or `8bit`. None reads it from the run's
            `hparams.yaml`/`config.yaml` next to the adapter (what `lpeft fit` leaves there), else `none`.
        quantization_options: The `BitsAndBytesConfig` arguments used in training (None: read like `quantization`).
        mode: `dequantized`, `original` or `quantized` (see the module docstring); all the same for a float base.
        dtype: Float dtype of the saved weights; default: the base checkpoint's own dtype (float32 if unknown).
        tolerance: Largest max-abs logit difference accepted between the merged and the unmerged model
            (default 1e-4).
        max_shard_size: Largest safetensors shard (`save_pretrained`'s `max_shard_size`).
        force: Replace an existing, non-empty `out`.
        compare_modes: Also merge with the other modes to report how each moves the logits. Default: when the
            base is quantized and under 2B parameters (each mode costs a float32 copy of the base).
        revision: Base model revision (Hub only).
        trust_remote_code: Allow the base model's own code (Hub only, for models you trust).

    Returns:
        The report that was written to `out/merge_report.json`.

    Raises:
        ConfigError: bad settings, an existing `out`, a method that cannot be merged (prompt learning).
        MergeVerificationError: the merged logits differ from the unmerged ones by more than `tolerance`, or are
            not finite; nothing is written then.
    """
    check_merge_options(mode, dtype, tolerance, quantization)
    job = _MergeJob.create(
        adapter_dir, out, base, quantization, quantization_options, revision, trust_remote_code, force
    )
    tolerance = DEFAULT_TOLERANCE if tolerance is None else float(tolerance)
    dtype = dtype or job.default_dtype()
    merged, merge_diff, shifts = job.run(mode, compare_modes)
    saved_diff = job.round_to(merged, dtype) if dtype != "float32" else merge_diff
    report = job.report(mode, dtype, tolerance, merge_diff, saved_diff, shifts)
    _raise_unless_passed(report, merge_diff, saved_diff, job.out)
    report.output = str(job.out)
    _write_folder(merged, job.tokenizer(), report, job.out, max_shard_size)
    _log_report(report)
    return report


# ---- the job: what to load, and how ----------------------------------------------------------------------------


@dataclass
class _Diff:
    max: float
    mean: float
    finite: bool

    def summary(self) -> dict[str, float | None]:
        return {"max_abs_logit_diff": _json_float(self.max), "mean_abs_logit_diff": _json_float(self.mean)}


@dataclass
class _MergeJob:
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
    probes: list[Any] = field(default_factory=list)
    reference: list[Any] = field(default_factory=list)  # the chosen mode's unmerged logits (float64 compute)
    trained: list[Any] = field(default_factory=list)  # a quantized base's trained model (bitsandbytes compute)
    _tokenizer: Any = field(default=None, repr=False)

    @classmethod
    def create(
        cls,
        adapter_dir: str | os.PathLike,
        out: str | os.PathLike,
        base: str | None,
        quantization: str | None,
        quantization_options: dict[str, Any] | None,
        revision: str | None,
        trust_remote_code: bool,
        force: bool,
    ) -> _MergeJob:
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
        quantization, options, source = _training_quantization(adapter_dir, quantization, quantization_options)
        if quantization == "none" and options:
            raise ConfigError(
                f"`quantization_options`={options!r} were given but `quantization` is 'none'; "
                "set the quantization the base was trained with (4bit or 8bit)."
            )
        return cls(
            adapter_dir, out, base, base_path, peft_type, quantization, options, source, revision, trust_remote_code
        )

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"

    def run(self, mode: str, compare: bool | None) -> tuple[torch.nn.Module, _Diff, dict[str, dict]]:
        """Merge with `mode` (and, when comparing, the other modes); return the merged model and the numbers.

        A quantized base is loaded once: it gives the trained model's logits, the weights `dequantized` merges
        onto, and, last, PEFT's requantizing merge for `quantized`.
        """
        trained, quantized_model = None, None
        if self.quantized:
            quantized_model = self.with_adapter(self.load_base(quantized=True))
            trained = self.trained = self.checked(_logits(quantized_model, self.probes, exact=False))
            compare = _cheap(quantized_model) if compare is None else compare
        modes = [m for m in ("original", "dequantized", "quantized") if m == mode or (compare and self.quantized)]
        shifts, kept = {}, None
        for current in modes:
            try:
                merged, reference, logits = self.merge(current, quantized_model)
            except ConfigError as err:
                if current == mode:
                    raise
                log.warning("Mode %s could not be measured: %s", current, err)
                shifts[current] = _Diff(math.nan, math.nan, False).summary()
                continue
            shifts[current] = _diff(logits, trained if trained is not None else reference).summary()
            if current == mode:
                kept, self.reference = (merged, _diff(logits, reference)), reference
            del merged
            gc.collect()
        return kept[0], kept[1], {m: shifts[m] for m in MERGE_MODES if m in shifts}

    def merge(self, mode: str, quantized_model: Any) -> tuple[torch.nn.Module, list[torch.Tensor], list[torch.Tensor]]:
        """Merge with `mode` into a float32 model; return it with the unmerged and the merged logits."""
        if self.quantized and mode == "quantized":
            # PEFT requantizes each merged weight (this consumes the quantized model: it comes last). Its
            # unmerged counterpart is the trained model itself; the float values of the result are what is saved.
            reference = self.trained
            float_model = self.load_base(quantized=False)
            _copy_dequantized(_merge(quantized_model, mode, self.peft_type), float_model)
            return float_model, reference, _logits(float_model, self.probes)
        float_model = self.load_base(quantized=False)
        if self.quantized and mode == "dequantized":
            _copy_dequantized(quantized_model.get_base_model(), float_model)
        peft_model = self.with_adapter(float_model)
        reference = self.checked(_logits(peft_model, self.probes))
        merged = _merge(peft_model, mode, self.peft_type)
        return merged, reference, _logits(merged, self.probes)

    def round_to(self, model: torch.nn.Module, dtype: str) -> _Diff:
        """Round the weights to `dtype` (kept in float32 storage) and measure them against the reference."""
        import torch

        with torch.no_grad():
            for param in model.parameters():  # buffers (rotary frequencies) are rebuilt in float32 at load
                param.data = param.data.to(getattr(torch, dtype)).to(torch.float32)
        diff = _diff(_logits(model, self.probes), self.reference)
        finite = all(bool(p.isfinite().all()) for p in model.parameters())
        return dataclasses.replace(diff, finite=diff.finite and finite)

    def checked(self, logits: list[torch.Tensor]) -> list[torch.Tensor]:
        if not all(bool(x.isfinite().all()) for x in logits):
            raise MergeVerificationError(
                f"The adapter model itself ({self.adapter_dir} on {self.base}) gives NaN/Inf logits, so a merge "
                "cannot be verified and nothing was written; check the adapter weights and `quantization`."
            )
        return logits

    # ---- loading ----

    def load_base(self, quantized: bool) -> torch.nn.Module:
        import torch

        from lightning_peft.models import load_base_model

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
        from lightning_peft.tokens import grow_embeddings

        # An adapter trained with tokens a chat template added holds their rows; the base needs them first.
        grow_embeddings(model, len(self.tokenizer()))
        if not self.probes:
            self.probes = _probe_inputs(self.tokenizer(), model.get_input_embeddings().weight.shape[0])
        return model

    def with_adapter(self, model: torch.nn.Module) -> Any:
        from lightning_peft.adapters import load_adapter

        return load_adapter(model, self.adapter_dir).eval()

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        if self._tokenizer is None:
            # The run saved its tokenizer beside the adapter; a plain PEFT folder may have none.
            source = self.adapter_dir if (self.adapter_dir / "tokenizer_config.json").is_file() else self.base_path
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=self.trust_remote_code)
            except (OSError, ValueError) as err:
                raise ConfigError(f"No tokenizer could be loaded from {source}: {err}") from err
        return self._tokenizer

    def default_dtype(self) -> str:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(self.base_path, trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError):
            return "float32"
        dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
        dtype = dtype.removeprefix("torch.")
        return dtype if dtype in MERGE_DTYPES else "float32"

    # ---- the report ----

    def reference_description(self, mode: str | None) -> str:
        trained = f"{self.quantization} base (float32 compute) + adapter, unmerged" if self.quantized else None
        if mode is None or not self.quantized:
            return trained or "base + adapter, unmerged"
        return {
            "dequantized": f"{self.quantization} base dequantized to float32 + adapter, unmerged",
            "original": "original full-precision base + adapter, unmerged",
            "quantized": trained,
        }[mode]

    def report(
        self, mode: str, dtype: str, tolerance: float, merge: _Diff, saved: _Diff, shifts: dict[str, Any]
    ) -> MergeReport:
        return MergeReport(
            mode=mode,
            dtype=dtype,
            base=self.base,
            base_path=self.base_path,
            adapter=str(self.adapter_dir),
            peft_type=self.peft_type,
            quantization=self.quantization,
            quantization_options=self.quantization_options,
            quantization_source=self.quantization_source,
            reference=self.reference_description(mode),
            trained_reference=self.reference_description(None),
            max_abs_logit_diff=merge.max,
            mean_abs_logit_diff=merge.mean,
            saved_dtype_max_abs_logit_diff=_json_float(saved.max),
            saved_dtype_mean_abs_logit_diff=_json_float(saved.mean),
            tolerance=tolerance,
            passed=merge.finite and saved.finite and merge.max <= tolerance,
            probe_count=len(self.probes),
            probe_tokens=sum(p.shape[1] for p in self.probes),
            shift_from_trained=shifts,
            versions=_versions(self.quantized),
        )


# ---- helpers -------------------------------------------------------------------------------------------------


def _check_out(out: Path, force: bool, protected: list[Path]) -> None:
    resolved = out.resolve()
    for folder in protected:
        if resolved == folder.resolve() or resolved in folder.resolve().parents:
            raise ConfigError(f"`out` {out} would replace {folder}; choose a new folder for the merged model.")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"`out` {out} exists and is not a folder; choose another path.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(
            f"`out` {out} already exists and is not empty; choose another folder or pass `force` (--force) "
            "to replace it."
        )


def _training_quantization(
    adapter_dir: Path, quantization: str | None, options: dict[str, Any] | None
) -> tuple[str, dict[str, Any] | None, str]:
    """The quantization the base had in training: given, else read from the run's files, else none."""
    if quantization is not None:
        return quantization, options, "argument"
    for name in ("hparams.yaml", "config.yaml"):
        path = adapter_dir.parent / name
        found = _quantization_in(path) if path.is_file() else None
        if found is not None:
            found_quantization, found_options = found
            if found_quantization not in QUANTIZATIONS:
                raise ConfigError(f"{path} has quantization={found_quantization!r}; pass `quantization` yourself.")
            log.info("Quantization in training: %s (read from %s)", found_quantization, path)
            return found_quantization, options if options is not None else found_options, str(path)
    return "none", options, "default"


def _quantization_in(path: Path) -> tuple[str, dict[str, Any] | None] | None:
    import yaml

    class Loader(yaml.SafeLoader):  # hparams.yaml may hold python object tags; they are never constructed
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    section = data.get("model", data) if isinstance(data.get("model"), dict) else data
    section = section.get("init_args", section) if isinstance(section.get("init_args"), dict) else section
    if "quantization" not in section:
        return None
    options = section.get("quantization_options")
    return str(section["quantization"]), options if isinstance(options, dict) else None


def _probe_inputs(tokenizer: Any, vocab_size: int) -> list[torch.Tensor]:
    """Fixed probes: tokenized text (plain and, with a chat template, a chat turn) and seeded random ids."""
    import torch

    texts = list(PROBE_TEXTS)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": PROBE_CHAT}]
        texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    probes = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:PROBE_LENGTH]
        if ids and max(ids) < vocab_size:
            probes.append(torch.tensor([ids]))
    generator = torch.Generator().manual_seed(PROBE_SEED)
    probes += [torch.randint(0, vocab_size, (1, PROBE_LENGTH), generator=generator) for _ in range(PROBE_RANDOM)]
    return probes


def _logits(model: torch.nn.Module, probes: list[torch.Tensor], exact: bool = True) -> list[torch.Tensor]:
    """Logits for each probe, on the CPU. `exact`: computed in float64, then the weights go back to float32.

    float32 forward passes differ by about 1e-4 on a 135M model's logits just from the order of operations
    (x @ W + x @ A @ B against x @ (W + B A)); float64 leaves only what the stored weights change. bitsandbytes
    models cannot run in float64 (`exact=False`).
    """
    import torch

    device = next(model.parameters()).device
    # bitsandbytes' int8 matmul logs a cast warning per layer and call; it says nothing the report does not.
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    bnb_logger.addFilter(_quiet_int8_cast)
    if exact:
        model.to(torch.float64)  # float32 -> float64 -> float32 is lossless
    try:
        with torch.no_grad(), _eager_experts(model) if exact else contextlib.nullcontext():
            return [model(input_ids=p.to(device), use_cache=False).logits.cpu() for p in probes]
    finally:
        if exact:
            model.to(torch.float32)
        bnb_logger.removeFilter(_quiet_int8_cast)


@contextlib.contextmanager
def _eager_experts(model: torch.nn.Module) -> Iterator[None]:
    """Run mixture-of-experts blocks with transformers' eager expert loop inside the block.

    transformers 5 computes fused experts with `torch._grouped_mm` by default, which has no float64 kernel;
    the eager loop computes the same products one expert at a time, in any dtype.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    getter = getattr(base, "get_experts_implementation", None)
    current = getter() if getter is not None else {}
    if not any(impl not in (None, "eager") for impl in current.values()):
        yield
        return
    base.set_experts_implementation("eager")
    try:
        yield
    finally:
        base.set_experts_implementation(current)


def _cheap(model: torch.nn.Module) -> bool:
    from lightning_peft.adapters import count_parameters

    total = count_parameters(model)[1]
    if total > COMPARE_MAX_PARAMS:
        log.info(
            "Not measuring the other merge modes for a %.1fB-parameter base (pass compare_modes to force it)",
            total / 1e9,
        )
    return total <= COMPARE_MAX_PARAMS


def _quiet_int8_cast(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt")


def _diff(logits: list[torch.Tensor], reference: list[torch.Tensor]) -> _Diff:
    import torch

    delta = torch.cat([(a.double() - b.double()).abs().flatten() for a, b in zip(logits, reference, strict=True)])
    finite = bool(torch.cat([x.flatten() for x in logits]).isfinite().all())
    return _Diff(max=float(delta.max()), mean=float(delta.mean()), finite=finite)


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


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _versions(quantized: bool) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from lightning_peft import __version__

    found = {"lightning_peft": __version__}
    for package in ("torch", "transformers", "peft", "safetensors", *(("bitsandbytes",) if quantized else ())):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


def _raise_unless_passed(report: MergeReport, merge: _Diff, saved: _Diff, out: Path) -> None:
    if report.passed:
        return
    where = f"nothing was written to {out}"
    if not merge.finite:
        raise MergeVerificationError(
            f"The merged model (mode {report.mode!r}) gives NaN/Inf logits; {where}. Check the adapter weights."
        )
    if not saved.finite:
        raise MergeVerificationError(
            f"The merged weights overflow in {report.dtype} (NaN/Inf logits); {where}. "
            "Save with `dtype` float32 or bfloat16 (--dtype)."
        )
    if report.mode == "quantized" and report.quantization != "none":
        why = f"mode 'quantized' requantizes the merged weights to {report.quantization}"
        fix = "Use mode 'dequantized' (the default), or pass a larger `tolerance` (--tolerance) to accept the loss"
    else:
        why = f"mode {report.mode!r}"
        fix = (
            "Check that `base` and `quantization` are the ones the adapter was trained with, or pass a larger "
            "`tolerance` (--tolerance) if the difference is acceptable"
        )
    raise MergeVerificationError(
        f"The merged model differs from the adapter model: max abs logit diff {merge.max:.3g} > tolerance "
        f"{report.tolerance:.3g} ({why}); {where}. {fix}."
    )


def _write_folder(model: Any, tokenizer: Any, report: MergeReport, out: Path, max_shard_size: str | int) -> None:
    """Stage the folder next to `out`, then rename it into place: `out` appears whole or not at all."""
    import torch

    model.to(getattr(torch, report.dtype))
    if hasattr(model.config, "quantization_config"):  # never the case for a float load; kept as a guarantee
        del model.config.quantization_config
    # `out` was checked (and --force given if it exists) before the slow part started.
    with staged_folder(out, overwrite=True) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")


def _log_report(report: MergeReport) -> None:
    log.info(
        "Merged %s adapter (mode %s, %s) into %s: max abs logit diff %.3g (tolerance %.3g), mean %.3g; report in %s",
        report.peft_type,
        report.mode,
        report.dtype,
        report.output,
        report.max_abs_logit_diff,
        report.tolerance,
        report.mean_abs_logit_diff,
        REPORT_FILE,
    )
    if report.quantization != "none":
        for mode, shift in report.shift_from_trained.items():
            log.info(
                "  mode %-11s logits vs the %s-trained model: max abs diff %.3g, mean %.3g",
                mode,
                report.quantization,
                shift["max_abs_logit_diff"] if shift["max_abs_logit_diff"] is not None else math.nan,
                shift["mean_abs_logit_diff"] if shift["mean_abs_logit_diff"] is not None else math.nan,
            )
