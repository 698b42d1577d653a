"""Turn a trained adapter folder into a package: the PEFT files, a model card and a manifest. Offline.

A package is a plain PEFT adapter folder (`PeftModel.from_pretrained` loads it) plus `README.md` (the card),
`lpeft_manifest.json` and, when the run logged metrics, `loss_curve.png`. Only known files are taken from
the source (the weights, adapter_config.json and tokenizer files): a stray `training_args.bin` or PEFT's own
placeholder README never travels. The same inputs give the same bytes, `created_at` aside.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from lightning_peft.atomic import staged_folder
from lightning_peft.errors import ConfigError
from lightning_peft.files import check_files, check_folder, read_json_object, read_safetensors_header
from lightning_peft.hub import manifest as manifest_lib
from lightning_peft.hub.card import CARD_FILE, build_card
from lightning_peft.hub.fingerprint import (
    FINGERPRINT_METHOD,
    BaseModel,
    fingerprint,
    locate_base,
)
from lightning_peft.hub.lint import LintReport, lint_adapter_config
from lightning_peft.hub.plot import LOSS_CURVE_FILE, can_plot, loss_curve_png
from lightning_peft.hub.registry import check_repo_id
from lightning_peft.hub.runinfo import RunRecord, read_run

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
TOKENIZER_FILES = (
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
)
_ADAPTER_KEYS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "use_dora",
    "use_rslora",
    "bias",
    "modules_to_save",
    "init_lora_weights",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "init_r",
    "target_r",
    "feedforward_modules",
    "num_virtual_tokens",
    "encoder_hidden_size",
    "prefix_projection",
    "alpha",
    "rank_dropout",
    "module_dropout",
    "trainable_token_indices",
)
_LIBRARIES = ("lightning-peft", "peft", "transformers", "torch", "lightning", "huggingface-hub", "safetensors")
_LICENSE = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")


@dataclass
class SourceAdapter:
    """A saved PEFT adapter folder, read without loading its weights."""

    path: Path
    config: dict[str, Any]
    weights: str
    tokenizer_files: list[str]


@dataclass
class PackageSpec:
    """What to package besides the adapter itself (the CLI's publish options)."""

    name: str
    version: str
    parent_version: str | None = None
    history: list[str] = field(default_factory=list)
    message: str = ""
    license: str | None = None
    description: str | None = None
    datasets: list[str] = field(default_factory=list)
    base: str | None = None
    base_model_id: str | None = None
    run_dir: str | Path | None = None
    allow_pickle: bool = False


@dataclass
class Package:
    """A package folder and what was learned while building it."""

    path: Path
    manifest: manifest_lib.Manifest
    base: BaseModel
    lint: LintReport
    source: SourceAdapter


def read_source(adapter_dir: str | os.PathLike, *, allow_pickle: bool = False) -> SourceAdapter:
    """Check that `adapter_dir` is a PEFT adapter folder and read its config (weights are never loaded).

    Raises:
        ConfigError: no adapter_config.json or no `peft_type` in it, no weights, or pickle-only weights without
            `allow_pickle`.
        CorruptFileError, FileNotFoundError, UnreadableFileError: a damaged, missing or unreadable file or folder.
    """
    path = check_folder(adapter_dir, "`ADAPTER_DIR`")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ConfigError(f"{path} is not a PEFT adapter folder: {CONFIG_FILE} is missing.")
    config = read_json_object(config_path)
    check_files(path)  # the weights' header and every JSON file (tokenizer files) that goes into the package
    if not config.get("peft_type"):
        raise ConfigError(f"{config_path} has no `peft_type`; it is not a PEFT adapter config.")
    tokenizer_files = [name for name in TOKENIZER_FILES if (path / name).is_file()]
    return SourceAdapter(path, config, _weights_file(path, allow_pickle), tokenizer_files)


def _weights_file(path: Path, allow_pickle: bool) -> str:
    if (path / WEIGHTS_FILE).is_file():
        read_safetensors_header(path / WEIGHTS_FILE)  # a corrupt file fails here, not on the user's machine
        return WEIGHTS_FILE
    if (path / PICKLE_WEIGHTS_FILE).is_file():
        if not allow_pickle:
            raise ConfigError(
                f"{path} has only pickle weights ({PICKLE_WEIGHTS_FILE}), which can run code when loaded and are "
                "never unpickled here; re-save the adapter with safetensors, or pass --allow-pickle to publish it as is."
            )
        return PICKLE_WEIGHTS_FILE
    raise ConfigError(f"{path} is not a PEFT adapter folder: {WEIGHTS_FILE} is missing.")


def package_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, spec: PackageSpec) -> Package:
    """Write the package of `adapter_dir` to `out_dir` (atomically; `out_dir` must be absent or empty).

    Raises:
        ConfigError: a bad adapter folder or option, or a base model that cannot be found to fingerprint.
        DataError: malformed run files or weights.
    """
    _check_spec(spec)
    source = read_source(adapter_dir, allow_pickle=spec.allow_pickle)
    base_name = spec.base or source.config.get("base_model_name_or_path") or ""
    if not base_name:
        raise ConfigError(f"{source.path / CONFIG_FILE} names no base model; pass `--base PATH_OR_ALIAS`.")
    base = locate_base(base_name, hub_id=spec.base_model_id)
    if base.hub_id is None:
        log.warning(
            "The base %s is a local folder with no known Hub id: the package names it by this path, which other "
            "machines do not have; pass --base-model-id ORG/NAME if it is a copy of a Hub model.",
            base.path,
        )
    base_fingerprint = fingerprint(base.path)
    record = read_run(source.path, spec.run_dir)
    with staged_folder(Path(out_dir)) as staging:
        payload = _write_payload(source, base, staging)
        curve_note = _write_loss_curve(record, staging, spec.name)
        if curve_note is None:
            payload.append(LOSS_CURVE_FILE)
        lint = lint_adapter_config(source.config)
        files = manifest_lib.file_entries(staging, payload)
        manifest = _manifest(spec, source, base, base_fingerprint, record, lint, files)
        (staging / CARD_FILE).write_text(
            build_card(manifest, description=spec.description, loss_curve_note=curve_note), encoding="utf-8"
        )
        manifest = dataclasses.replace(manifest, files=manifest_lib.file_entries(staging, [*payload, CARD_FILE]))
        manifest_lib.write(staging, manifest)
    return Package(Path(out_dir), manifest, base, lint, source)


def _check_spec(spec: PackageSpec) -> None:
    check_repo_id(spec.name)
    if spec.license is not None and not _LICENSE.match(spec.license):
        raise ConfigError(
            f"`--license`={spec.license!r} is not a Hub license id; use a lowercase id such as apache-2.0, mit or other."
        )
    for dataset in spec.datasets:
        check_repo_id(dataset, option="--dataset", need_namespace=False)
    if spec.base_model_id is not None:
        check_repo_id(spec.base_model_id, option="--base-model-id", need_namespace=False)


def _write_payload(source: SourceAdapter, base: BaseModel, staging: Path) -> list[str]:
    """Copy the weights and tokenizer files; write adapter_config.json naming the base by its Hub id."""
    for name in [source.weights, *source.tokenizer_files]:
        shutil.copyfile(source.path / name, staging / name)
    config = dict(source.config)
    if base.hub_id:
        # A Hub id, not this machine's path: PEFT and vLLM resolve the base from it on another machine.
        config["base_model_name_or_path"] = base.hub_id
        if base.revision:
            config["revision"] = base.revision
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return [CONFIG_FILE, source.weights, *source.tokenizer_files]


def _write_loss_curve(record: RunRecord, staging: Path, name: str) -> str | None:
    """Draw loss_curve.png; return None when drawn, else the sentence the card says instead."""
    if not record.train_loss and not record.val_loss:
        return (
            "No loss values were logged for this run (no `metrics.jsonl` or `metrics.csv` with `train_loss`), "
            "so there is no loss curve."
        )
    if not can_plot():
        log.warning("matplotlib is not installed, so the card has no loss curve: pip install 'lightning-peft[hub]'")
        return "The loss curve was not drawn (matplotlib was not installed where this package was built)."
    (staging / LOSS_CURVE_FILE).write_bytes(loss_curve_png(record.train_loss, record.val_loss, name))
    return None


def _manifest(
    spec: PackageSpec,
    source: SourceAdapter,
    base: BaseModel,
    base_fingerprint: str,
    record: RunRecord,
    lint: LintReport,
    files: tuple[manifest_lib.FileEntry, ...],
) -> manifest_lib.Manifest:
    return manifest_lib.Manifest(
        format=manifest_lib.FORMAT,
        format_version=manifest_lib.FORMAT_VERSION,
        name=spec.name,
        version=spec.version,
        parent_version=spec.parent_version,
        history=tuple(spec.history),
        created_at=created_at(),
        message=spec.message,
        license=spec.license,
        base_model=manifest_lib.BaseModelInfo(
            id=base.hub_id,
            revision=base.revision,
            fingerprint=base_fingerprint,
            fingerprint_method=FINGERPRINT_METHOD,
            weights=base.weights,
            alias=base.alias,
        ),
        adapter=_adapter_section(source),
        files=files,
        training=manifest_lib.TrainingInfo(record.summary, record.hyperparameters, tuple(record.sources)),
        evaluation=record.evaluation,
        datasets=manifest_lib.DatasetsInfo(
            # Declared with --dataset, then those the run read from the Hub; local files by name only.
            hub=tuple(dict.fromkeys([*spec.datasets, *(source["id"] for source in record.hub_sources)])),
            files=record.data_files,
            hub_sources=tuple(manifest_lib.HubSource(**source) for source in record.hub_sources),
        ),
        harness=tuple(manifest_lib.harness_score(score, where="lm_eval.json") for score in record.harness),
        libraries=library_versions(),
        serving=manifest_lib.ServingInfo(
            vllm_compatible=lint.vllm_compatible,
            problems=tuple(lint.problems),
            notes=tuple(lint.notes),
            max_lora_rank=lint.max_lora_rank,
        ),
    )


def _adapter_section(source: SourceAdapter) -> manifest_lib.AdapterInfo:
    hparams = {}
    for key in _ADAPTER_KEYS:
        value = source.config.get(key)
        if value is None or value == {} or value == []:
            continue
        hparams[key] = sorted(value) if isinstance(value, list) and key.endswith("modules") else value
    return manifest_lib.AdapterInfo(
        method=str(source.config["peft_type"]).upper(),
        task_type=source.config.get("task_type"),
        peft_version=source.config.get("peft_version"),
        hyperparameters=hparams,
        parameters=_parameter_count(source),
    )


def _parameter_count(source: SourceAdapter) -> int | None:
    if source.weights != WEIGHTS_FILE:
        return None  # counting would mean unpickling
    header, _ = read_safetensors_header(source.path / WEIGHTS_FILE)
    return sum(math.prod(info["shape"]) for name, info in header.items() if name != "__metadata__")


def created_at() -> str:
    """Now in UTC (ISO 8601), or `SOURCE_DATE_EPOCH` when set, for fully reproducible packages."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    try:
        seconds = int(epoch) if epoch else time.time()
    except ValueError:
        raise ConfigError(f"`SOURCE_DATE_EPOCH`={epoch!r} is not an integer number of seconds.") from None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that make and load the package (read without importing them)."""
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
