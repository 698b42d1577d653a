"""`AdapterMerge`: when fit ends, merge the trained adapter into its base and write a transformers model folder."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.trainer.states import TrainerStatus
from typing_extensions import override

from lightning_peft.errors import ConfigError
from lightning_peft.merging import MergeDtype, MergeMode, MergeReport, check_merge_options, merge_adapter
from lightning_peft.run_folder import run_dir

log = logging.getLogger(__name__)


class AdapterMerge(L.Callback):
    """Merge the adapter into the base model at the end of a successful fit, verified (see `lpeft merge`).

    The base is loaded exactly as the module loaded it in training (`model_name_or_path`, `quantization`,
    `quantization_options`), so a QLoRA adapter is merged onto the dequantized 4-bit weights it was trained
    against by default. The merged folder loads with `AutoModelForCausalLM.from_pretrained` and holds
    `merge_report.json`; a merge that fails its logit check writes nothing and fails `trainer.fit` with the reason.

    It runs in the fit stage's `teardown`, on global rank zero: Lightning calls the callbacks' `on_fit_end` before
    the module's, and the module writes its final adapter in its own `on_fit_end`. Merging afterwards merges
    exactly the adapter folder the run leaves behind, and a failed merge can never cost that adapter.

    Args:
        dirpath: Where the merged model goes; default `<run folder>/merged` (see `lightning_peft.run_folder`).
        mode: `dequantized` (default), `original` or `quantized` (lossy); they differ only for a quantized base.
        dtype: Float dtype of the saved weights (`float32`, `bfloat16`, `float16`); default: the base checkpoint's.
        tolerance: Largest max-abs logit difference accepted between the merged and unmerged model (default 1e-4).
        max_shard_size: Largest safetensors shard.
        compare_modes: Also measure the other modes for the report (default: when the base is quantized).
        overwrite: Replace an existing, non-empty `dirpath` (otherwise fit refuses to start).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        mode: MergeMode = "dequantized",
        dtype: MergeDtype | None = None,
        tolerance: float | None = None,
        max_shard_size: str = "2GB",
        compare_modes: bool | None = None,
        overwrite: bool = False,
    ) -> None:
        check_merge_options(mode, dtype, tolerance)
        self.dirpath = dirpath
        self.mode = mode
        self.dtype = dtype
        self.tolerance = tolerance
        self.max_shard_size = max_shard_size
        self.compare_modes = compare_modes
        self.overwrite = overwrite
        self.report: MergeReport | None = None

    def target(self, trainer: L.Trainer) -> Path:
        """The folder the merged model is written to."""
        return Path(self.dirpath) if self.dirpath else run_dir(trainer) / "merged"

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _check_module(pl_module)
        target = self.target(trainer)
        if trainer.is_global_zero and target.is_dir() and any(target.iterdir()) and not self.overwrite:
            raise ConfigError(
                f"`AdapterMerge.dirpath` {target} already exists and is not empty; choose another folder or set "
                "`overwrite: true`."
            )

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning calls teardown hooks only when fit returned normally (an exception skips them).
        if stage != "fit" or trainer.state.status != TrainerStatus.RUNNING:
            return
        # run_dir (a broadcast on its first call) and saving an FSDP-sharded adapter (a gather) need every process.
        target = self.target(trainer)
        adapter_dir = _final_adapter_dir(pl_module)
        staging = None
        if adapter_dir is None:  # the module did not save one (save_adapter_on_fit_end: false)
            staging = _existing_parent(target) / f".{target.name}-adapter-to-merge"
            adapter_dir = pl_module.save_adapter(staging / "adapter")  # written by rank zero only
        if not trainer.is_global_zero:
            return
        log.info("AdapterMerge: merging the trained adapter into %s", target)
        try:
            hp = pl_module.hparams
            self.report = merge_adapter(
                adapter_dir,
                target,
                base=hp.model_name_or_path,
                quantization=hp.quantization,
                quantization_options=hp.get("quantization_options"),
                mode=self.mode,
                dtype=self.dtype,
                tolerance=self.tolerance,
                max_shard_size=self.max_shard_size,
                force=self.overwrite,
                compare_modes=self.compare_modes,
                revision=hp.get("revision"),
                trust_remote_code=bool(hp.get("trust_remote_code", False)),
            )
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)


def _check_module(pl_module: L.LightningModule) -> None:
    from lightning_peft.adapters import is_prompt_learning

    hp = getattr(pl_module, "hparams", {})
    if "model_name_or_path" not in hp or "quantization" not in hp or not hasattr(pl_module, "save_adapter"):
        raise ConfigError(
            f"AdapterMerge needs a lightning_peft PeftCausalLM (or a subclass), got {type(pl_module).__name__}."
        )
    config = getattr(pl_module, "peft_config", None)
    if config is not None and is_prompt_learning(config):
        raise ConfigError(
            f"AdapterMerge cannot merge a {type(config).__name__} adapter: prompt-learning methods add virtual "
            "tokens, not weight changes. Remove the AdapterMerge callback for this run."
        )


def _final_adapter_dir(pl_module: Any) -> Path | None:
    if not pl_module.hparams.get("save_adapter_on_fit_end", False):
        return None
    folder = getattr(pl_module, "final_adapter_dir", None)
    return Path(folder) if folder is not None and (Path(folder) / "adapter_config.json").is_file() else None


def _existing_parent(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.parent
