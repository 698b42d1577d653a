"""Distributed presets for PEFT fine-tuning: DDP, FSDP2 (`ModelParallelStrategy`) and FSDP1 (`FSDPStrategy`).

Every preset is usable from YAML::

    trainer:
      strategy:
        class_path: lightning_peft.strategies.FSDP2
        init_args: {reshard_after_forward: true}

- `DDP`: plain data parallelism; every rank holds the whole model. LoRA needs no `find_unused_parameters`.
- `FSDP2`: `ModelParallelStrategy` with all processes in one data-parallel (sharding) dimension. `PeftCausalLM`
  calls `shard_decoder_layers` in `configure_model`: each decoder layer is `fully_shard`-ed, then the root. Runs
  on CPUs (gloo) as well as GPUs; frozen and trainable parameters may share a layer.
- `FSDP1`: `FSDPStrategy` for GPUs, auto-wrapping the model's decoder-layer class with `use_orig_params=True`
  (frozen and trainable parameters in one flat parameter). QLoRA needs `bnb_4bit_quant_storage` equal to the
  compute dtype, otherwise FSDP's casts destroy the packed 4-bit weights: checked before wrapping.

The final adapter is always the gathered, complete one (`gather_adapter_state_dict`), written once by rank zero.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from typing_extensions import override

from lightning_peft.errors import ConfigError
from lightning_peft.options import DtypeName

log = logging.getLogger(__name__)


# ---- finding and sharding the decoder layers -----------------------------------------------------------------


def decoder_layer_classes(model: torch.nn.Module, names: Iterable[str] | None = None) -> set[type[torch.nn.Module]]:
    """The module classes of `model`'s repeated decoder layers (the units FSDP shards or wraps one by one).

    Found from `names` when given (class names, e.g. `["LlamaDecoderLayer"]`), else from the transformers model's
    `_no_split_modules`, else from the longest `ModuleList` whose entries all share one class.

    Raises:
        ConfigError: no decoder layer class could be found (or a given name matches no module).
    """
    wanted = set(names) if names is not None else _no_split_module_names(model)
    if wanted:
        found = {type(m) for m in model.modules() if type(m).__name__ in wanted}
        if found:
            return found
        if names is not None:
            raise ConfigError(f"`layer_class_names`={sorted(wanted)!r} match no module of {type(model).__name__}.")
    best: list[torch.nn.Module] = []
    for module in model.modules():
        same_class = isinstance(module, torch.nn.ModuleList) and len({type(m) for m in module}) == 1
        if same_class and len(module) > len(best):
            best = list(module)
    if not best:
        raise ConfigError(
            f"Cannot find the decoder layers of {type(model).__name__}: set `layer_class_names` on the strategy."
        )
    return {type(best[0])}


def _no_split_module_names(model: torch.nn.Module) -> set[str]:
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def decoder_layers(model: torch.nn.Module, names: Iterable[str] | None = None) -> list[torch.nn.Module]:
    """The decoder-layer modules of `model`, outermost first (a layer nested in another is not listed twice)."""
    classes = tuple(decoder_layer_classes(model, names))
    layers: list[torch.nn.Module] = []
    for module in model.modules():
        if isinstance(module, classes) and not any(module in set(outer.modules()) for outer in layers):
            layers.append(module)
    return layers


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"Dtype {name!r} is not a torch dtype; use float32, bfloat16 or float16.")
    return dtype


def shard_decoder_layers(
    model: torch.nn.Module,
    mesh: Any,
    *,
    reshard_after_forward: bool = True,
    param_dtype: str | None = None,
    reduce_dtype: str | None = None,
    layer_class_names: Iterable[str] | None = None,
) -> torch.nn.Module:
    """Apply FSDP2's `fully_shard` to each decoder layer of `model`, then to `model` itself (in place).

    Args:
        model: the PEFT model (adapter already injected: FSDP2 shards the parameters it finds).
        mesh: a 1-D device mesh (`PeftCausalLM` passes the `data_parallel` dimension of the strategy's mesh).
        reshard_after_forward: free the gathered layer weights after forward (less memory, one more all-gather).
        param_dtype / reduce_dtype: FSDP2 mixed precision (e.g. `bfloat16` compute, `float32` gradient reduction).
        layer_class_names: decoder-layer class names, when `_no_split_modules` does not name them.

    Returns:
        `model`, now holding DTensor parameters.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    options: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if param_dtype is not None or reduce_dtype is not None:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=_dtype(param_dtype), reduce_dtype=_dtype(reduce_dtype))
    layers = decoder_layers(model, layer_class_names)
    name = type(model).__name__  # before fully_shard swaps the class for an FSDP subclass
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)
    log.info("FSDP2: sharded %d decoder layers of %s and the root", len(layers), name)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` holds DTensor (FSDP2-sharded) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


# ---- the complete adapter from sharded parameters ------------------------------------------------------------


def gather_adapter_state_dict(peft_model: torch.nn.Module, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The full (unsharded) CPU tensors of the adapter's `keys` of `peft_model.state_dict()`.

    A collective under FSDP2: every rank must call it (each DTensor is all-gathered with `full_tensor()`, in the
    state dict's order, which is the same on every rank). Frozen base weights are never gathered.
    """
    from torch.distributed.tensor import DTensor

    wanted = set(keys)
    gathered = {}
    for name, tensor in peft_model.state_dict().items():
        if name in wanted:
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            gathered[name] = full.detach().cpu().clone()
    return gathered


def gathered_adapter_state(pl_module: Any) -> dict[str, torch.Tensor] | None:
    """The complete adapter tensors of `pl_module.model` (a PEFT model) when it is sharded, else `None`.

    A collective under FSDP: every rank must call it. FSDP2 (DTensor parameters): only the adapter's tensors are
    all-gathered, on every rank. FSDP1 (`FSDPStrategy`, GPUs only, not exercised by the CPU tests): the strategy's
    full state dict is gathered (rank zero receives it) and the adapter's keys are kept.
    """
    from lightning_peft.adapters import adapter_state_keys

    model = pl_module.model
    if is_sharded(model):
        return gather_adapter_state_dict(model, adapter_state_keys(model))
    trainer = pl_module._trainer
    if trainer is not None and isinstance(trainer.strategy, FSDPStrategy) and trainer.world_size > 1:
        keys = adapter_state_keys(model)  # wrapper prefixes removed: the names of the full state dict
        full = trainer.strategy.lightning_module_state_dict()
        return {name: t for k, t in full.items() if (name := k.removeprefix("model.")) in keys}
    return None


def save_gathered_adapter(
    peft_model: Any, directory: str | Path, tokenizer: Any | None, state: dict[str, torch.Tensor]
) -> Path:
    """Save gathered adapter tensors in plain PEFT format, atomically (call it on rank zero only).

    PEFT's own `save_pretrained` writes them, given as `state_dict`: the folder is the same as an unsharded run's
    (same keys, config and tokenizer files).
    """
    from lightning_peft.adapters import save_options
    from lightning_peft.atomic import staged_folder

    directory = Path(directory)
    with staged_folder(directory, overwrite=True) as staging:
        peft_model.save_pretrained(staging, state_dict=state, safe_serialization=True, **save_options(peft_model))
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return directory


# ---- presets -------------------------------------------------------------------------------------------------


class DDP(DDPStrategy):
    """Data-parallel preset: `DDPStrategy` with the settings LoRA wants.

    `find_unused_parameters` stays off (every adapter parameter gets a gradient each step) and gradients are
    bucketed as views (`gradient_as_bucket_view`) to save a copy. Same as `trainer.strategy: ddp` otherwise.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("find_unused_parameters", False)
        kwargs.setdefault("gradient_as_bucket_view", True)
        super().__init__(**kwargs)


class FSDP2(ModelParallelStrategy):
    """FSDP2 preset: all processes (all nodes) shard the model's decoder layers in one data-parallel dimension.

    `PeftCausalLM.configure_model` applies `shard_decoder_layers` with this strategy's settings. Works on CPUs
    (gloo) and GPUs (nccl), for LoRA and QLoRA.

    Args:
        reshard_after_forward: free each layer's gathered weights after its forward (ZeRO-3 style); `false`
            keeps them until backward (ZeRO-2 style: faster, more memory).
        param_dtype: FSDP2 compute dtype of the gathered parameters (`bfloat16` ...); default: as stored.
        reduce_dtype: dtype of the gradient reduce-scatter; default: `param_dtype`.
        layer_class_names: decoder-layer class names, when the model's `_no_split_modules` does not name them.
        save_distributed_checkpoint: Lightning checkpoints as one folder of shards per rank (`true`), or
            gathered into one file by rank zero (`false`, the default: the adapter-only checkpoints are small).
        process_group_backend: `gloo` / `nccl`; default: chosen for the accelerator.
    """

    def __init__(
        self,
        reshard_after_forward: bool = True,
        param_dtype: DtypeName | None = None,
        reduce_dtype: DtypeName | None = None,
        layer_class_names: list[str] | None = None,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        _dtype(param_dtype)
        _dtype(reduce_dtype)
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            **kwargs,
        )
        self.shard_options: dict[str, Any] = {
            "reshard_after_forward": reshard_after_forward,
            "param_dtype": param_dtype,
            "reduce_dtype": reduce_dtype,
            "layer_class_names": layer_class_names,
        }

    @override
    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" would give one data-parallel group per node (tensor parallel inside a
        # node); LoRA sharding wants every process in the data-parallel dimension.
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Gathered checkpoints hold the adapter only: gather just its tensors, never the frozen base."""
        module = self.lightning_module
        keys = getattr(module, "adapter_state_keys", None)
        if self._save_distributed_checkpoint or keys is None:
            return super().lightning_module_state_dict()
        assert self.model is not None
        return gather_adapter_state_dict(self.model, keys())

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Also load `AdapterCheckpoint` folders (ModelParallelStrategy bypasses `checkpoint_io`)."""
        from lightning_peft.callbacks.checkpoint_folder import is_checkpoint_folder, read_checkpoint

        path = self.broadcast(checkpoint_path)
        if not is_checkpoint_folder(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        from lightning.fabric.strategies.model_parallel import _rekey_optimizer_state_if_needed
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        assert self.model is not None
        checkpoint = read_checkpoint(path)
        # Every rank holds the full adapter: each keeps its own shard of it.
        full = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.model, checkpoint.pop("state_dict"), options=full)
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", []), strict=True):
            state = _rekey_optimizer_state_if_needed(state, self.model)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state, options=full)
        return checkpoint


class FSDP1(FSDPStrategy):
    """FSDP1 preset for GPUs: `FSDPStrategy` auto-wrapping each decoder layer, frozen and trainable params mixed.

    Use `trainer.precision: bf16-mixed` (LoRA) or `bf16-true` (QLoRA with `bnb_4bit_quant_storage: bfloat16`)
    for mixed precision. Lightning's `FSDPStrategy` runs on CUDA only.

    Args:
        layer_class_names: decoder-layer class names to wrap; default: found from the model (`_no_split_modules`).
        sharding_strategy: `FULL_SHARD`, `SHARD_GRAD_OP`, `HYBRID_SHARD` or `NO_SHARD`.
        **kwargs: any other `FSDPStrategy` argument (`cpu_offload`, `state_dict_type`, ...).
    """

    def __init__(
        self,
        layer_class_names: list[str] | None = None,
        sharding_strategy: str = "FULL_SHARD",
        **kwargs: Any,
    ) -> None:
        if "auto_wrap_policy" in kwargs:
            raise ConfigError("The FSDP1 preset chooses `auto_wrap_policy` itself; set `layer_class_names` instead.")
        kwargs.setdefault("use_orig_params", True)
        if not kwargs["use_orig_params"]:
            raise ConfigError(
                "`use_orig_params: false` cannot mix frozen base and trainable adapter parameters in one FSDP unit; "
                "keep it true."
            )
        kwargs.setdefault("limit_all_gathers", True)
        super().__init__(sharding_strategy=sharding_strategy, **kwargs)  # type: ignore[arg-type]
        self.layer_class_names = layer_class_names

    def wrap_policy(self, model: torch.nn.Module) -> Any:
        """The auto-wrap policy for `model`: one FSDP unit per decoder layer."""
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return ModuleWrapPolicy(decoder_layer_classes(model, self.layer_class_names))

    @override
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        check_quant_storage(self.lightning_module)
        self.kwargs["auto_wrap_policy"] = self.wrap_policy(model)
        return super()._setup_model(model)


def check_quant_storage(module: Any) -> None:
    """Refuse a 4-bit model whose `bnb_4bit_quant_storage` differs from its compute dtype (under FSDP).

    FSDP flattens and casts parameters to one dtype; 4-bit weights packed as uint8 (bitsandbytes' default storage)
    are then cast like floats and destroyed. Storing them in the compute dtype keeps them intact.
    """
    hparams = getattr(module, "hparams", {}) or {}
    if hparams.get("quantization") != "4bit":
        return
    compute = getattr(module, "base_dtype", None)
    storage_name = (hparams.get("quantization_options") or {}).get("bnb_4bit_quant_storage", "uint8")
    storage = storage_name if isinstance(storage_name, torch.dtype) else getattr(torch, str(storage_name), None)
    if storage != compute:
        name = str(compute).removeprefix("torch.")
        raise ConfigError(
            f"QLoRA under FSDP needs `model.quantization_options.bnb_4bit_quant_storage` equal to the compute dtype "
            f"({name}), got {storage_name!r}: FSDP's casts would destroy the 4-bit weights. Set "
            f"`quantization_options: {{bnb_4bit_quant_storage: {name}}}`."
        )
