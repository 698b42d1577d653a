"""The Axolotl → lightning-peft conversion itself: one `Converter` per config (see `axolotl.py` for the API).

Each Axolotl key is taken out of the config as it is carried to the `model` (PeftCausalLM), `data`
(SFTDataModule) or `trainer` section with Axolotl's meaning; what is left at the end is reported with a reason.
Where Axolotl's defaults differ from lightning-peft's (micro batch size 1, one epoch, gradient clipping at 1.0,
3% warmup, no length grouping), the converted config spells Axolotl's out. The semantics follow Axolotl's own
code: `utils/schemas/*.py` (keys and defaults), `loaders/adapter.py` (the LoRA config, `lora_target_linear`),
`prompt_strategies/chat_template.py` (roles to train, EOS per turn) and its trainer builder (warmup).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lightning_peft.errors import ConfigError
from lightning_peft.interop.axolotl_data import DataConversion
from lightning_peft.interop.axolotl_keys import (
    ADAPTER_TYPES,
    ATTENTION,
    ATTENTION_SHORT_NAMES,
    ATTENTION_SWITCHES,
    AXOLOTL_ONLY,
    BNB_OPTIONS,
    EMBEDDING_LAYERS,
    LORA_FIELDS,
    OFF_IS_DEFAULT,
    OFF_PREFIXES,
    OPTIMIZERS,
    PREFIX_REASONS,
    REASONS,
    SCHEDULERS,
    UNKNOWN,
)
from lightning_peft.interop.axolotl_result import Conversion, Dropped
from lightning_peft.interop.axolotl_values import integer, number, unset


class Converter(DataConversion):
    """One conversion: takes keys out of the Axolotl config as they are carried; what is left is reported."""

    def __init__(self, source: Mapping[str, Any]) -> None:
        self.source = {str(k): v for k, v in source.items()}
        self.rest = dict(self.source)
        self.model: dict[str, Any] = {}
        self.data: dict[str, Any] = {}
        self.trainer: dict[str, Any] = {}
        self.seed: int | None = None
        self.dropped: list[Dropped] = []
        self.notes: list[str] = []
        self.taken: set[str] = set()  # the keys a conversion step read (a set value)

    def take(self, key: str, default: Any = None) -> Any:
        """Remove `key` and return its value; Axolotl reads null and empty values as unset: `default`."""
        value = self.rest.pop(key, None)
        if unset(value):
            return default
        self.taken.add(key)
        return value

    def drop(self, key: str, value: Any, reason: str) -> None:
        self.dropped.append(Dropped(key, value, reason))

    def run(self) -> Conversion:
        """The run config, the settings not carried, the notes and the top-level keys carried."""
        self._base_model()
        self._quantization()
        self._adapter()
        self._data()
        self._batches_and_length()
        self._optimization()
        self._precision_and_memory()
        self._evaluation_and_checkpoints()
        self._leftovers()
        config: dict[str, Any] = {} if self.seed is None else {"seed_everything": self.seed}
        config.update(model=self.model, data=self.data, trainer=self.trainer)
        whole = {d.key for d in self.dropped}
        # Carried: read by a conversion step and not dropped whole, or a switch left off as lightning-peft has it.
        carried = [
            key
            for key, value in self.source.items()
            if key not in whole and key not in AXOLOTL_ONLY and (key in self.taken or value is False)
        ]
        return Conversion(config, self.dropped, self.notes, carried)

    # ---- model -------------------------------------------------------------------------------------------------

    def _base_model(self) -> None:
        base = self.take("base_model")
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(
                f"`base_model` is {'missing' if base is None else repr(base)}; give the model's Hub id or folder."
            )
        self.model["model_name_or_path"] = base
        for key in ("base_model_config", "tokenizer_config"):
            other = self.take(key)
            if other is not None and other != base:
                self.drop(key, other, "the model config and tokenizer are loaded from base_model")
        if (revision := self.take("revision_of_model")) is not None:
            self.model["revision"] = str(revision)
        if self.take("trust_remote_code") is True:
            self.model["trust_remote_code"] = True
        model_type = self.take("model_type")
        if model_type is not None and not str(model_type).endswith("ForCausalLM"):
            self.drop("model_type", model_type, "every base is loaded with AutoModelForCausalLM")
        tokenizer_type = self.take("tokenizer_type")
        if tokenizer_type is not None and not str(tokenizer_type).endswith(("Tokenizer", "TokenizerFast")):
            self.drop("tokenizer_type", tokenizer_type, "every tokenizer is loaded with AutoTokenizer")
        from lightning_peft.models import ALIASES  # torch-free

        for alias, spec in ALIASES.items():
            if spec.hub_id.lower() == base.lower():
                self.notes.append(
                    f"base_model {base} also ships offline as the alias `{alias}` (converted from a GGUF file, so "
                    "not bit-identical); use it as model.model_name_or_path on a machine without the Hub."
                )

    def _quantization(self) -> None:
        adapter = self.take("adapter")
        if adapter is None:
            raise ConfigError(
                "`adapter` is not set, which makes it an Axolotl full fine-tune; lightning-peft trains adapters: "
                "set `adapter: lora` (or qlora) to convert it."
            )
        if adapter not in ADAPTER_TYPES:
            raise ConfigError(f"`adapter`={adapter!r} is not an adapter type `lpeft convert` knows; use lora or qlora.")
        four, eight = bool(self.take("load_in_4bit")), bool(self.take("load_in_8bit"))
        peft = self.take("peft")
        if isinstance(peft, Mapping):
            four, eight = self._peft_block(peft, four, eight)
        elif peft is not None:
            self.drop("peft", peft, UNKNOWN)
        if four and eight:
            raise ConfigError("`load_in_4bit` and `load_in_8bit` are both true; choose one.")
        if adapter == "qlora" and eight:
            raise ConfigError(
                "`adapter: qlora` with `load_in_8bit: true`: QLoRA loads the base in 4-bit; set load_in_4bit."
            )
        if adapter == "qlora" and not four:
            self.notes.append(
                "`adapter: qlora` without `load_in_4bit: true` (Axolotl requires it): converted as 4-bit."
            )
            four = True
        if four or eight:
            self.model["quantization"] = "4bit" if four else "8bit"
        options = self.take("bnb_config_kwargs") or {}
        carried = {k: v for k, v in options.items() if k in BNB_OPTIONS and v is not None}
        for key in sorted(set(options) - BNB_OPTIONS):
            self.drop(f"bnb_config_kwargs.{key}", options[key], "not a transformers.BitsAndBytesConfig argument")
        if carried and (four or eight):
            self.model["quantization_options"] = carried
        elif carried:
            self.drop("bnb_config_kwargs", carried, "the base is not quantized (load_in_4bit / load_in_8bit are off)")

    def _peft_block(self, peft: Mapping[str, Any], four: bool, eight: bool) -> tuple[bool, bool]:
        """Newer Axolotl's `peft: {backend, weight_dtype, ...}`: bitsandbytes nf4 is 4-bit, int8 is 8-bit."""
        peft = dict(peft)
        backend, dtype = peft.pop("backend", None), peft.pop("weight_dtype", None)
        if backend == "torchao":
            self.drop("peft.backend", backend, "torchao quantization is not supported; bitsandbytes quantizes the base")
        elif dtype in ("nf4", "int8"):
            four, eight = four or dtype == "nf4", eight or dtype == "int8"
        elif dtype is not None:
            self.drop("peft.weight_dtype", dtype, "bitsandbytes quantizes to nf4 (4-bit) or int8 only")
        for key, value in peft.items():
            if not unset(value):
                self.drop(f"peft.{key}", value, UNKNOWN)
        return four, eight

    def _adapter(self) -> None:
        fields = [(key, name, self.take(key)) for key, name in LORA_FIELDS.items()]
        lora = {name: value for _, name, value in fields if value is not None and value is not False}
        targets = self._target_modules()
        adapter_dir = self.take("lora_model_dir")
        if adapter_dir is not None:
            self.model["adapter_path"] = str(adapter_dir)
            why = "lora_model_dir is set: the saved adapter's own adapter_config.json defines the adapter"
            for key, _, value in fields:
                if value is not None and value is not False:
                    self.drop(key, value, why)
            return
        if targets is not None:
            lora["target_modules"] = targets
        if lora:
            self.model["adapter"] = lora

    def _target_modules(self) -> str | list[str] | None:
        modules = self.take("lora_target_modules")
        if self.take("lora_target_linear") is True:
            # Axolotl adds every linear layer but the output one to the listed modules; PEFT's all-linear is
            # that set, and cannot be combined with a list.
            listed = [modules] if isinstance(modules, str) else list(modules or [])
            embeddings = [m for m in listed if m in EMBEDDING_LAYERS]
            if embeddings:
                self.drop(
                    "lora_target_modules",
                    embeddings,
                    "all-linear leaves the embeddings and output layer out and takes no extra names; list every "
                    "module in lora_target_modules (without lora_target_linear) to train them too",
                )
            return "all-linear"
        if modules is not None:
            return modules
        self.notes.append(
            "neither lora_target_modules nor lora_target_linear is set (Axolotl would give PEFT no targets); "
            "lightning-peft targets every linear layer (all-linear)."
        )
        return None

    # ---- batches, schedule, precision --------------------------------------------------------------------------

    def _batches_and_length(self) -> None:
        micro, accumulate, total = (
            self.take(k) for k in ("micro_batch_size", "gradient_accumulation_steps", "batch_size")
        )
        micro = integer("micro_batch_size", micro) if micro is not None else None
        accumulate = integer("gradient_accumulation_steps", accumulate) if accumulate is not None else None
        if total is not None:
            total = integer("batch_size", total)
            if micro is None and accumulate:
                micro = max(total // accumulate, 1)
            elif accumulate is None and micro:
                accumulate = max(total // micro, 1)
            elif micro and accumulate and micro * accumulate != total:
                self.drop("batch_size", total, "micro_batch_size x gradient_accumulation_steps decide the batch")
        self.data["batch_size"] = micro or 1  # Axolotl's default micro batch is 1 (lightning-peft's is 4)
        if (eval_batch := self.take("eval_batch_size")) is not None:
            self.data["val_batch_size"] = integer("eval_batch_size", eval_batch)
        if accumulate and accumulate > 1:
            self.trainer["accumulate_grad_batches"] = accumulate
        if (length := self.take("sequence_len")) is not None:
            self.data["max_length"] = integer("sequence_len", length)
        packing = bool(self.take("sample_packing"))
        if packing:
            self.data["packing"] = True
        eval_packing = self.take("eval_sample_packing")
        if eval_packing is not None and bool(eval_packing) != packing:
            self.drop(
                "eval_sample_packing", eval_packing, "validation batches are packed exactly when training ones are"
            )
        if self.take("train_on_inputs") is True:
            self.data["train_on_prompt"] = True
        # Axolotl's default is no length grouping; lightning-peft's is grouping.
        self.data["group_by_length"] = bool(self.take("group_by_length"))
        if (workers := self.take("dataloader_num_workers")) is not None:
            self.data["num_workers"] = integer("dataloader_num_workers", workers)
        if self.take("pad_to_sequence_len") is True:
            self.drop(
                "pad_to_sequence_len", True, "batches are padded to their longest row only (the loss is the same)"
            )
        if (seed := self.take("seed")) is not None:
            self.seed = self.data["seed"] = integer("seed", seed)

    def _optimization(self) -> None:
        if (rate := self.take("learning_rate")) is not None:
            self.model["learning_rate"] = number("learning_rate", rate)
        if decay := self.take("weight_decay"):
            self.model["weight_decay"] = number("weight_decay", decay)
        optimizer = self.take("optimizer")
        if optimizer is not None:
            if (mapped := OPTIMIZERS.get(str(optimizer))) is None:
                self.drop(
                    "optimizer",
                    optimizer,
                    "the optimizers are adamw, adamw_8bit, paged_adamw, paged_adamw_8bit; AdamW is used",
                )
            elif mapped != "adamw":
                self.model["optimizer"] = mapped
        scheduler = str(self.take("lr_scheduler", "cosine"))  # Axolotl's default
        if (mapped := SCHEDULERS.get(scheduler)) is None:
            self.drop(
                "lr_scheduler", scheduler, "the schedules are cosine, linear, constant(_with_warmup); cosine is used"
            )
        elif mapped != "cosine":
            self.model["lr_scheduler"] = mapped
        self._warmup(scheduler)
        # transformers' max_grad_norm defaults to 1.0, so Axolotl clips gradients unless told not to; Lightning does not.
        clip = number("max_grad_norm", self.take("max_grad_norm", 1.0))
        if clip > 0:
            self.trainer["gradient_clip_val"] = clip

    def _warmup(self, scheduler: str) -> None:
        steps, ratio = self.take("warmup_steps"), self.take("warmup_ratio")
        if scheduler == "constant":  # transformers' constant schedule has no warmup, whatever the warmup settings
            for key, value in (("warmup_steps", steps), ("warmup_ratio", ratio)):
                if value:
                    self.drop(key, value, "lr_scheduler: constant ignores warmup; use constant_with_warmup to warm up")
        elif steps is not None:
            self.model["warmup_steps"] = integer("warmup_steps", steps)
        elif ratio is not None:
            self.model["warmup_ratio"] = number("warmup_ratio", ratio)
        else:
            self.model["warmup_ratio"] = 0.03
            self.notes.append(
                "no warmup_steps or warmup_ratio: Axolotl warms up over 3% of the steps, at most 100; converted as "
                "model.warmup_ratio: 0.03 (set model.warmup_steps: 100 for runs longer than 3,333 steps)."
            )

    def _precision_and_memory(self) -> None:
        bf16, fp16 = self.take("bf16", "auto"), self.take("fp16")
        bfloat16, float16 = self.take("bfloat16"), self.take("float16")
        self.take("float32")
        if bf16 == "full" or bfloat16 is True:
            precision: str | None = "bf16-true"
        elif bf16 is True:
            precision = "bf16-mixed"
        elif fp16 is True or float16 is True:
            precision = "16-mixed" if fp16 is True else "16-true"
        elif bf16 is False:
            precision = "32-true"
        else:  # auto: bf16-mixed where supported, like lightning-peft's own choice
            precision = None
        if precision is not None:
            self.trainer["precision"] = precision
        if (tf32 := self.take("tf32")) is True:
            self.drop("tf32", tf32, "TF32 is not switched on; call torch.set_float32_matmul_precision('high') yourself")
        checkpointing = self.take("gradient_checkpointing")
        if checkpointing:
            self.model["gradient_checkpointing"] = True
            if checkpointing is not True:
                self.drop(
                    "gradient_checkpointing",
                    checkpointing,
                    "activation offloading is not supported; plain checkpointing is used",
                )
        self._attention()
        if str(self.model.get("attn_implementation", "")).startswith("flash_attention"):
            self.notes.append(
                f"model.attn_implementation: {self.model['attn_implementation']} needs a CUDA GPU and the flash-attn "
                "package; set it to sdpa elsewhere."
            )

    def _attention(self) -> None:
        named = self.take("attn_implementation")
        short = self.take("attention")
        switched = [key for key in ATTENTION_SWITCHES if self.take(key) is True]
        for key in switched[1:]:  # Axolotl takes the first in its priority order
            self.drop(key, True, f"{switched[0]} is also set and takes precedence")
        chosen, key = None, None
        if named is not None:
            chosen, key = named, "attn_implementation"
        elif short is not None:
            chosen, key = ATTENTION_SHORT_NAMES.get(str(short), short), "attention"
        elif switched:
            chosen, key = ATTENTION_SWITCHES[switched[0]], switched[0]
        if key is None:
            return
        if chosen in ATTENTION:
            self.model["attn_implementation"] = chosen
        else:
            self.drop(key, named or short or True, f"not available; the implementations are {', '.join(ATTENTION)}")

    # ---- loop, evaluation, checkpoints ---------------------------------------------------------------------------

    def _evaluation_and_checkpoints(self) -> None:
        self._length()
        if (output := self.take("output_dir")) is not None:
            self.trainer["default_root_dir"] = str(output)
        if (every := self.take("logging_steps")) is not None:
            self.trainer["log_every_n_steps"] = integer("logging_steps", every)
        callbacks: list[dict[str, Any]] = []
        self._evaluation(callbacks)
        self._checkpoints(callbacks)
        if callbacks:
            self.trainer["callbacks"] = callbacks

    def _length(self) -> None:
        steps, epochs = self.take("max_steps"), self.take("num_epochs")
        if steps is not None and integer("max_steps", steps) > 0:
            self.trainer["max_steps"] = int(steps)  # takes precedence over num_epochs, as in transformers
            return
        value = number("num_epochs", 1 if epochs is None else epochs)  # Axolotl's default: one epoch
        self.trainer["max_epochs"] = math.ceil(value)
        if not value.is_integer():
            self.drop(
                "num_epochs",
                epochs,
                f"Lightning counts whole epochs: max_epochs {math.ceil(value)}; set trainer.max_steps for a part of one",
            )

    def _evaluation(self, callbacks: list[dict[str, Any]]) -> None:
        keys = ("eval_steps", "evals_per_epoch", "eval_strategy", "early_stopping_patience")
        steps, per_epoch, strategy, patience = (self.take(k) for k in keys)
        if "val_file" not in self.data and "val_fraction" not in self.data:
            for key, value in zip(keys, (steps, per_epoch, strategy, patience), strict=True):
                if value is not None:
                    self.drop(key, value, "there is no validation data (val_set_size 0, no test_datasets)")
            return
        accumulate = self.trainer.get("accumulate_grad_batches", 1)
        if strategy == "no":
            self.trainer["limit_val_batches"] = 0
        elif steps is not None and number("eval_steps", steps) >= 1:
            # Lightning counts training batches, transformers optimizer steps.
            self.trainer["val_check_interval"] = int(steps) * accumulate
            self.trainer["check_val_every_n_epoch"] = None
        elif steps is not None:
            self.drop(
                "eval_steps",
                steps,
                "a fraction of all steps; set trainer.val_check_interval (batches, or a fraction of an epoch)",
            )
        elif per_epoch is not None and integer("evals_per_epoch", per_epoch) > 1:
            self.trainer["val_check_interval"] = 1 / int(per_epoch)
        if patience is not None:
            init = {"monitor": "val_loss", "mode": "min", "patience": integer("early_stopping_patience", patience)}
            callbacks.append({"class_path": "lightning.pytorch.callbacks.EarlyStopping", "init_args": init})

    def _checkpoints(self, callbacks: list[dict[str, Any]]) -> None:
        steps, per_epoch, strategy = self.take("save_steps"), self.take("saves_per_epoch"), self.take("save_strategy")
        if strategy == "no":
            self.trainer["enable_checkpointing"] = False  # the final adapter is still written
            return
        init: dict[str, Any] = {}
        if steps is not None and number("save_steps", steps) >= 1:
            # transformers keeps every step checkpoint unless save_total_limit says otherwise.
            init = {"every_n_train_steps": int(steps), "save_top_k": -1}
        elif steps is not None:
            self.drop(
                "save_steps", steps, "a fraction of all steps; set every_n_train_steps on an AdapterCheckpoint callback"
            )
        if per_epoch is not None and integer("saves_per_epoch", per_epoch) > 1 and not init:
            self.drop(
                "saves_per_epoch",
                per_epoch,
                "checkpoints are per epoch or every N steps; set every_n_train_steps on an AdapterCheckpoint callback",
            )
        if init:
            callbacks.append({"class_path": "lightning_peft.callbacks.AdapterCheckpoint", "init_args": init})

    def _leftovers(self) -> None:
        for key, value in self.rest.items():
            if unset(value) or key in AXOLOTL_ONLY:
                continue
            if value is False and (key in OFF_IS_DEFAULT or key.startswith(OFF_PREFIXES)):
                continue
            self.drop(key, value, _reason(key))


def _reason(key: str) -> str:
    if key in REASONS:
        return REASONS[key]
    return next((why for prefix, why in PREFIX_REASONS if key.startswith(prefix)), UNKNOWN)
