"""The Axolotl → lightning-peft conversion itself: one `Converter` per config (see `axolotl.py` for the API).

Each Axolotl key is taken out of the config as it is carried to the `model` (PeftCausalLM), `data`
(SFTDataModule) or `trainer` section with Axolotl's meaning; what is left at the end is reported with a reason.
Where Axolotl's defaults differ from lightning-peft's (micro batch size 1, one epoch, gradient clipping at 1.0,
3% warmup, no length grouping), the converted config spells Axolotl's out. The semantics follow Axolotl's own
code: `utils/schemas/*.py` (keys and defaults), `loaders/adapter.py` (the LoRA config, `lora_target_linear`),
`prompt_strategies/chat_template.py` (roles to train, EOS per turn) and its trainer builder (warmup).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_peft.errors import ConfigError
from lightning_peft.interop.axolotl_keys import (
    ADAPTER_TYPES,
    ATTENTION,
    ATTENTION_SHORT_NAMES,
    ATTENTION_SWITCHES,
    AXOLOTL_ONLY,
    BNB_OPTIONS,
    DATA_SUFFIXES,
    DATASET_REASONS,
    EMBEDDING_LAYERS,
    LORA_FIELDS,
    OFF_IS_DEFAULT,
    OFF_PREFIXES,
    OPTIMIZERS,
    PREFIX_REASONS,
    REASONS,
    SCHEDULERS,
    SHAREGPT_ROLES,
    UNKNOWN,
)


@dataclass(frozen=True)
class Dropped:
    """An Axolotl setting the converted config does not carry.

    Attributes:
        key: Where it was, e.g. `deepspeed` or `datasets[0].roles_to_train`.
        value: What it held.
        reason: Why it is not carried, and what to do instead.
    """

    key: str
    value: Any
    reason: str

    def line(self) -> str:
        return f"{self.key}={_show(self.value)}: {self.reason}"


class Converter:
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
        if _unset(value):
            return default
        self.taken.add(key)
        return value

    def drop(self, key: str, value: Any, reason: str) -> None:
        self.dropped.append(Dropped(key, value, reason))

    def run(self) -> tuple[dict[str, Any], list[Dropped], list[str], list[str]]:
        """(the run config, the settings not carried, the notes, the top-level keys carried)."""
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
        return config, self.dropped, self.notes, carried

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
            if not _unset(value):
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

    # ---- data --------------------------------------------------------------------------------------------------

    def _data(self) -> None:
        datasets = self.take("datasets")
        if datasets is None:
            self.notes.append("no `datasets`: set data.train_file to a local data file before running.")
        elif not isinstance(datasets, list):
            raise ConfigError(f"`datasets` must be a list of data sets (path, type ...), got {_show(datasets)}.")
        elif len(datasets) == 1:
            self._dataset(datasets[0], "datasets[0]", "train_file")
        else:
            # Axolotl concatenates its data sets; train_datasets entries without weight or count do the same.
            self.data["train_datasets"] = [self._mixture_entry(e, f"datasets[{i}]") for i, e in enumerate(datasets)]
        tests = self.take("test_datasets")
        fraction = self.take("val_set_size", 0)
        if isinstance(tests, list) and tests:
            self._dataset(tests[0], "test_datasets[0]", "val_file")
            for i, other in enumerate(tests[1:], 1):
                self.drop(f"test_datasets[{i}]", other, "SFTDataModule validates on one file")
            if fraction:
                self.drop("val_set_size", fraction, "test_datasets gives the validation data")
        elif fraction:
            value = _number("val_set_size", fraction)
            if 0 < value < 1:
                self.data["val_fraction"] = value
            else:
                self.drop("val_set_size", fraction, "a count of examples; data.val_fraction holds out a fraction (0-1)")
        self._chat_template("chat_template", self.take("chat_template"))

    def _dataset(self, entry: Any, where: str, setting: str) -> None:
        """One data set as data.train_file or data.val_file: a path, or {path, name, split, revision} for the Hub."""
        source, kind, fmt, columns = self._source(entry, where, setting)
        self.data[setting] = source["path"] if len(source) == 1 else source
        if setting == "train_file":
            if fmt is not None:
                self.data["format"] = fmt
            if columns:
                self.data["columns"] = columns
        elif kind is not None and (fmt, columns) != (self.data.get("format"), self.data.get("columns", {})):
            self.drop(f"{where}.type", kind, "the validation file is read with the training data's format and columns")

    def _mixture_entry(self, entry: Any, where: str) -> dict[str, Any]:
        """One entry of data.train_datasets: the source with its own format and columns."""
        source, _, fmt, columns = self._source(entry, where, "train_datasets")
        return {**source, **({"format": fmt} if fmt else {}), **({"columns": columns} if columns else {})}

    def _source(self, entry: Any, where: str, setting: str) -> tuple[dict[str, Any], Any, str | None, dict[str, str]]:
        """(the source: {path} or a Hub {path, name, split, revision}; Axolotl's type; our format; columns)."""
        if not isinstance(entry, Mapping):
            raise ConfigError(f"`{where}` must be a mapping with `path` and `type`, got {_show(entry)}.")
        rest = {str(k): v for k, v in entry.items()}
        source = self._location(rest, where, setting)
        kind = rest.pop("type", None)
        fmt, columns = self._format(kind, rest, where)
        for key, value in rest.items():
            if not _unset(value):
                self.drop(f"{where}.{key}", value, DATASET_REASONS.get(key, UNKNOWN))
        return source, kind, fmt, columns

    def _location(self, rest: dict[str, Any], where: str, setting: str) -> dict[str, Any]:
        path = self._data_file(rest, where, setting)
        hub = {key: rest.pop(key) for key in ("name", "revision", "split") if not _unset(rest.get(key))}
        if not _is_hub_id(path):
            split = hub.pop("split", None)
            if split not in (None, "train"):
                self.drop(f"{where}.split", split, "a file is read whole, a save_to_disk folder by its train split")
            rest.update(hub)  # name and revision: dropped with their reasons
            return {"path": path}
        self.notes.append(
            f"{where}.path {path!r} is not a local file, so it is loaded from the Hugging Face Hub with `datasets` "
            "(pip install 'lightning-peft[data]'); offline (HF_HUB_OFFLINE=1) it must be in the `datasets` cache."
        )
        # Unless told, Axolotl reads the "train" split of `datasets` and the "test" split of `test_datasets`;
        # data.train_file reads "train" too, but data.val_file "validation": spell that one out.
        hub.setdefault("split", "test" if setting == "val_file" else "train")
        if setting != "val_file" and hub["split"] == "train":
            del hub["split"]
        return {"path": path, **hub}

    def _data_file(self, rest: dict[str, Any], where: str, setting: str) -> str:
        files, path = rest.pop("data_files", None), rest.pop("path", None)
        rest.pop("ds_type", None)  # the reader goes by the file's extension
        rest.pop("trust_remote_code", None)
        if isinstance(files, list):
            for extra in files[1:]:
                self.drop(f"{where}.data_files", extra, "one file per data set; merge the files into one")
            files = files[0] if files else None
        source = files or path
        if _unset(source):
            raise ConfigError(f"`{where}` has neither `path` nor `data_files`.")
        source = str(source)
        if source.startswith(("s3://", "gs://", "gcs://", "http://", "https://")):
            self.notes.append(f"{where} is remote ({source}): download it and set data.{setting} to the local file.")
        return source

    def _format(self, kind: Any, rest: dict[str, Any], where: str) -> tuple[str | None, dict[str, str]]:
        """The SFTDataModule format and column mapping for a data set entry (its format keys are taken out)."""
        fmt = _format_of(kind)
        columns: dict[str, str] = {}
        if fmt is None:
            if kind is not None:
                self.drop(
                    f"{where}.type",
                    kind,
                    "no lightning-peft data format matches it (messages, prompt_completion, alpaca, text); "
                    "data.format stays auto, which detects the format from the file's columns",
                )
            return None, columns
        if fmt == "text" and rest.get("field") not in (None, "text"):
            columns["text"] = str(rest["field"])
        rest.pop("field", None)
        if fmt == "messages":
            self._chat_dataset(rest, where, columns)
        return fmt, columns

    def _chat_dataset(self, rest: dict[str, Any], where: str, columns: dict[str, str]) -> None:
        field_messages = rest.pop("field_messages", None)
        if field_messages not in (None, "messages"):
            columns["messages"] = str(field_messages)
        mapping = dict(rest.pop("message_property_mappings", None) or {})
        for legacy, prop in (("message_field_role", "role"), ("message_field_content", "content")):
            if (value := rest.pop(legacy, None)) is not None:
                mapping.setdefault(prop, value)
        fields = (mapping.pop("role", "role"), mapping.pop("content", "content"))
        if fields not in (("role", "content"), ("from", "value")):
            self.drop(
                f"{where}.message_property_mappings",
                {"role": fields[0], "content": fields[1]},
                "messages are read as {role, content} or ShareGPT {from, value}; rename the fields in the file",
            )
        for prop, column in mapping.items():
            self.drop(f"{where}.message_property_mappings.{prop}", column, "only role and content are read")
        if (roles := rest.pop("roles", None)) is not None:
            self._roles(roles, where, sharegpt=fields == ("from", "value"))
        trained = rest.pop("roles_to_train", None)
        if trained is not None and set(trained) != {"assistant"}:  # Axolotl's default: ["assistant"]
            self.drop(
                f"{where}.roles_to_train",
                trained,
                "the loss is on assistant turns (or on every token with data.train_on_prompt: true)",
            )
        eos = rest.pop("train_on_eos", None)
        if eos not in (None, "turn"):  # Axolotl's default: the end of each trained turn, as lightning-peft does
            self.drop(f"{where}.train_on_eos", eos, "the end-of-turn token of each assistant turn is learned (`turn`)")
        self._chat_template(f"{where}.chat_template", rest.pop("chat_template", None))
        if (jinja := rest.pop("chat_template_jinja", None)) is not None:
            self.drop(f"{where}.chat_template_jinja", jinja, REASONS["chat_template_jinja"])

    def _roles(self, roles: Any, where: str, *, sharegpt: bool) -> None:
        """Axolotl's {target: [source roles]}: carried when the data module reads each source as its target."""
        ok = isinstance(roles, Mapping) and all(
            (SHAREGPT_ROLES.get(s, s) if sharegpt else s) == target
            for target, sources in roles.items()
            for s in (sources or [])
        )
        if not ok:
            self.drop(
                f"{where}.roles",
                roles,
                "role names are read as the file holds them (ShareGPT human/gpt become user/assistant); "
                "rename the roles in the file",
            )

    def _chat_template(self, key: str, template: Any) -> None:
        if (
            template is None
            or template == "tokenizer_default"
            or str(template).startswith("tokenizer_default_fallback_")
        ):
            return
        self.drop(
            key,
            template,
            "conversations are rendered with the base tokenizer's own chat template; to use another, set "
            "chat_template in the model folder's tokenizer_config.json",
        )

    # ---- batches, schedule, precision --------------------------------------------------------------------------

    def _batches_and_length(self) -> None:
        micro, accumulate, total = (
            self.take(k) for k in ("micro_batch_size", "gradient_accumulation_steps", "batch_size")
        )
        micro = _integer("micro_batch_size", micro) if micro is not None else None
        accumulate = _integer("gradient_accumulation_steps", accumulate) if accumulate is not None else None
        if total is not None:
            total = _integer("batch_size", total)
            if micro is None and accumulate:
                micro = max(total // accumulate, 1)
            elif accumulate is None and micro:
                accumulate = max(total // micro, 1)
            elif micro and accumulate and micro * accumulate != total:
                self.drop("batch_size", total, "micro_batch_size x gradient_accumulation_steps decide the batch")
        self.data["batch_size"] = micro or 1  # Axolotl's default micro batch is 1 (lightning-peft's is 4)
        if (eval_batch := self.take("eval_batch_size")) is not None:
            self.data["val_batch_size"] = _integer("eval_batch_size", eval_batch)
        if accumulate and accumulate > 1:
            self.trainer["accumulate_grad_batches"] = accumulate
        if (length := self.take("sequence_len")) is not None:
            self.data["max_length"] = _integer("sequence_len", length)
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
            self.data["num_workers"] = _integer("dataloader_num_workers", workers)
        if self.take("pad_to_sequence_len") is True:
            self.drop(
                "pad_to_sequence_len", True, "batches are padded to their longest row only (the loss is the same)"
            )
        if (seed := self.take("seed")) is not None:
            self.seed = self.data["seed"] = _integer("seed", seed)

    def _optimization(self) -> None:
        if (rate := self.take("learning_rate")) is not None:
            self.model["learning_rate"] = _number("learning_rate", rate)
        if decay := self.take("weight_decay"):
            self.model["weight_decay"] = _number("weight_decay", decay)
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
        clip = _number("max_grad_norm", self.take("max_grad_norm", 1.0))
        if clip > 0:
            self.trainer["gradient_clip_val"] = clip

    def _warmup(self, scheduler: str) -> None:
        steps, ratio = self.take("warmup_steps"), self.take("warmup_ratio")
        if scheduler == "constant":  # transformers' constant schedule has no warmup, whatever the warmup settings
            for key, value in (("warmup_steps", steps), ("warmup_ratio", ratio)):
                if value:
                    self.drop(key, value, "lr_scheduler: constant ignores warmup; use constant_with_warmup to warm up")
        elif steps is not None:
            self.model["warmup_steps"] = _integer("warmup_steps", steps)
        elif ratio is not None:
            self.model["warmup_ratio"] = _number("warmup_ratio", ratio)
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
            self.trainer["log_every_n_steps"] = _integer("logging_steps", every)
        callbacks: list[dict[str, Any]] = []
        self._evaluation(callbacks)
        self._checkpoints(callbacks)
        if callbacks:
            self.trainer["callbacks"] = callbacks

    def _length(self) -> None:
        steps, epochs = self.take("max_steps"), self.take("num_epochs")
        if steps is not None and _integer("max_steps", steps) > 0:
            self.trainer["max_steps"] = int(steps)  # takes precedence over num_epochs, as in transformers
            return
        value = _number("num_epochs", 1 if epochs is None else epochs)  # Axolotl's default: one epoch
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
        elif steps is not None and _number("eval_steps", steps) >= 1:
            # Lightning counts training batches, transformers optimizer steps.
            self.trainer["val_check_interval"] = int(steps) * accumulate
            self.trainer["check_val_every_n_epoch"] = None
        elif steps is not None:
            self.drop(
                "eval_steps",
                steps,
                "a fraction of all steps; set trainer.val_check_interval (batches, or a fraction of an epoch)",
            )
        elif per_epoch is not None and _integer("evals_per_epoch", per_epoch) > 1:
            self.trainer["val_check_interval"] = 1 / int(per_epoch)
        if patience is not None:
            init = {"monitor": "val_loss", "mode": "min", "patience": _integer("early_stopping_patience", patience)}
            callbacks.append({"class_path": "lightning.pytorch.callbacks.EarlyStopping", "init_args": init})

    def _checkpoints(self, callbacks: list[dict[str, Any]]) -> None:
        steps, per_epoch, strategy = self.take("save_steps"), self.take("saves_per_epoch"), self.take("save_strategy")
        if strategy == "no":
            self.trainer["enable_checkpointing"] = False  # the final adapter is still written
            return
        init: dict[str, Any] = {}
        if steps is not None and _number("save_steps", steps) >= 1:
            # transformers keeps every step checkpoint unless save_total_limit says otherwise.
            init = {"every_n_train_steps": int(steps), "save_top_k": -1}
        elif steps is not None:
            self.drop(
                "save_steps", steps, "a fraction of all steps; set every_n_train_steps on an AdapterCheckpoint callback"
            )
        if per_epoch is not None and _integer("saves_per_epoch", per_epoch) > 1 and not init:
            self.drop(
                "saves_per_epoch",
                per_epoch,
                "checkpoints are per epoch or every N steps; set every_n_train_steps on an AdapterCheckpoint callback",
            )
        if init:
            callbacks.append({"class_path": "lightning_peft.callbacks.AdapterCheckpoint", "init_args": init})

    def _leftovers(self) -> None:
        for key, value in self.rest.items():
            if _unset(value) or key in AXOLOTL_ONLY:
                continue
            if value is False and (key in OFF_IS_DEFAULT or key.startswith(OFF_PREFIXES)):
                continue
            self.drop(key, value, _reason(key))


def _format_of(kind: Any) -> str | None:
    """The SFTDataModule format for an Axolotl dataset `type`, or None."""
    return (
        {"alpaca": "alpaca", "chat_template": "messages", "completion": "text"}.get(kind)
        if isinstance(kind, str)
        else None
    )


def _is_hub_id(path: str) -> bool:
    """ORG/NAME naming no local path and no data file: what `lightning_peft.data.sources.is_hub_id` reads as the
    Hub (restated here because importing `lightning_peft.data` imports torch, which `lpeft convert` must not)."""
    name = path.removeprefix("hf://datasets/").partition("@")[0]
    parts = name.split("/")
    return (
        len(parts) == 2
        and all(part and not part.startswith(".") for part in parts)
        and not name.startswith(("~", "/"))
        and Path(name).suffix.lower() not in DATA_SUFFIXES
        and not Path(path).expanduser().exists()
    )


def _reason(key: str) -> str:
    if key in REASONS:
        return REASONS[key]
    return next((why for prefix, why in PREFIX_REASONS if key.startswith(prefix)), UNKNOWN)


def _unset(value: Any) -> bool:
    return value is None or (isinstance(value, str | list | dict) and not value)


def _number(key: str, value: Any) -> float:
    # YAML 1.1 reads 2e-4 (no dot) as a string; Axolotl converts it, so do we.
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"`{key}`={value!r} is not a number.") from None
    if isinstance(value, bool) or math.isnan(number):
        raise ConfigError(f"`{key}`={value!r} is not a number.")
    return number


def _integer(key: str, value: Any) -> int:
    number = _number(key, value)
    if not number.is_integer():
        raise ConfigError(f"`{key}`={value!r} must be a whole number.")
    return int(number)


def _show(value: Any, limit: int = 80) -> str:
    """A value on one short line, for the header and the warnings."""
    text = value if isinstance(value, str) and "\n" not in value else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
