"""What each Axolotl key becomes in lightning-peft, and why the others cannot be carried (`lpeft convert`).

Tables only; `axolotl.py` does the converting. Sources: Axolotl's `utils/schemas/*.py` (keys, defaults),
`loaders/adapter.py` (the LoRA config it builds) and transformers' `OptimizerNames` / `SchedulerType`.
"""

from __future__ import annotations

from lightning_peft.options import ATTN_IMPLEMENTATIONS

# Mirrors of lightning-peft settings, so that converting imports neither torch nor the data package (the tests
# check each against its original: data.formats, data.readers, module.PeftCausalLM).
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
# Axolotl's chat template names whose templates (`utils/chat_templates/templates/*.jinja`) render every
# conversation they accept exactly like these built-ins (tests/test_axolotl.py renders both); the others differ in
# whitespace, default system prompts or BOS handling, so they are not mapped to a look-alike.
AXOLOTL_TEMPLATES = {"chatml": "chatml", "llama3": "llama3", "gemma": "gemma"}
FALLBACK_PREFIX = "tokenizer_default_fallback_"
ATTENTION = ATTN_IMPLEMENTATIONS

ADAPTER_TYPES = ("lora", "qlora")
# transformers' OptimizerNames (Axolotl's `optimizer`) → PeftCausalLM.optimizer.
OPTIMIZERS = {
    "adamw_torch": "adamw",
    "adamw_torch_fused": "adamw",  # Axolotl's default
    "adamw_hf": "adamw",
    "adamw_bnb_8bit": "adamw_8bit",
    "adamw_8bit": "adamw_8bit",
    "paged_adamw_32bit": "paged_adamw",
    "paged_adamw_8bit": "paged_adamw_8bit",
}
# transformers' SchedulerType (Axolotl's `lr_scheduler`) → PeftCausalLM.lr_scheduler (linear warmup, then ...).
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}
# Axolotl's LoRA keys → peft.LoraConfig fields (what Axolotl's `_build_peft_lora_config` passes on).
LORA_FIELDS = {
    "lora_r": "r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "lora_modules_to_save": "modules_to_save",
    "lora_fan_in_fan_out": "fan_in_fan_out",
    "peft_use_dora": "use_dora",
    "peft_use_rslora": "use_rslora",
    "peft_layers_to_transform": "layers_to_transform",
    "peft_layers_pattern": "layers_pattern",
    "peft_init_lora_weights": "init_lora_weights",
    "lora_rank_pattern": "rank_pattern",
    "lora_alpha_pattern": "alpha_pattern",
    "peft_layer_replication": "layer_replication",
    "peft_trainable_token_indices": "trainable_token_indices",
    "lora_exclude_modules": "exclude_modules",
    "lora_target_parameters": "target_parameters",
    "peft_ensure_weight_tying": "ensure_weight_tying",
}
# Input and output embeddings: Axolotl's lora_target_linear leaves the output one out, like PEFT's all-linear.
EMBEDDING_LAYERS = frozenset({"lm_head", "embed_tokens", "embed_in", "embed_out", "word_embeddings", "wte"})
BNB_OPTIONS = frozenset(
    {
        "bnb_4bit_quant_type",
        "bnb_4bit_use_double_quant",
        "bnb_4bit_compute_dtype",
        "bnb_4bit_quant_storage",
        "llm_int8_threshold",
        "llm_int8_skip_modules",
        "llm_int8_has_fp16_weight",
        "llm_int8_enable_fp32_cpu_offload",
    }
)
# Axolotl's legacy attention switches → PeftCausalLM.attn_implementation (None: not available), in Axolotl's
# priority order (its `LEGACY_ATTN_FLAG_TO_IMPL`); newer configs say `attn_implementation` (or `attention`).
ATTENTION_SWITCHES = {
    "xformers_attention": None,
    "s2_attention": None,
    "sage_attention": None,
    "flex_attention": "flex_attention",
    "flash_attention": "flash_attention_2",
    "sdp_attention": "sdpa",
    "eager_attention": "eager",
}
ATTENTION_SHORT_NAMES = {"flash": "flash_attention_2", "flex": "flex_attention", "sdp": "sdpa"}

# Keys that steer Axolotl itself, whatever their value: there is nothing to carry.
AXOLOTL_ONLY = frozenset(
    {
        "strict",
        "axolotl_config_path",
        "local_rank",
        "shuffle_merged_datasets",  # the training sampler shuffles the examples of every data set together
        "is_falcon_derived_model",
        "is_llama_derived_model",
        "is_mistral_derived_model",
        "is_qwen_derived_model",
    }
)
# Switches whose `false` is what lightning-peft does anyway.
OFF_IS_DEFAULT = frozenset(
    {
        "tf32",
        "fp8",
        "pad_to_sequence_len",
        "debug",
        "gptq",
        "relora",
        "merge_lora",
        "lora_on_cpu",
        "load_best_model_at_end",
        "save_only_model",
        "torch_compile",
        "qlora_sharded_model_loading",
        "auto_find_batch_size",
        "skip_prepare_dataset",
        "sample_packing_sequentially",
        "curriculum_sampling",
        "use_pose",
        "mean_resizing_embeddings",
        "resize_token_embeddings_to_32x",
        "dataset_exact_deduplication",
        "include_tokens_per_second",
        "use_tensorboard",
        "lora_mlp_kernel",
        "lora_qkv_kernel",
        "lora_o_kernel",
    }
)
OFF_PREFIXES = ("unsloth_", "liger_", "flash_attn_", "flash_optimum")

_STRATEGY = "DeepSpeed/FSDP settings are not carried; set trainer.strategy (ddp, or lightning_peft.strategies.FSDP2)"
_TOKENS = "the tokenizer is used as it is (no added or replaced tokens; batches need no pad token, labels mask it)"
_RL = "preference/RL training is not supported: lightning-peft does supervised fine-tuning"
_KERNELS = "Axolotl's fused-kernel patches have no lightning-peft equivalent"
_EVAL_GEN = "no generations during evaluation; run `lpeft predict` on a prompts file instead"
_LOGGER = (
    "not set up by the conversion; add the matching Lightning logger to trainer.logger (the model card's metrics "
    "come from the run folder's metrics.jsonl, written whatever the loggers)"
)
_ADAM = "PeftCausalLM uses the optimizer's default betas and epsilon"
_SCHEDULE = "the schedules are linear warmup then cosine/linear decay to zero, or constant; no other shape options"
REASONS = {
    "deepspeed": _STRATEGY,
    "special_tokens": _TOKENS,
    "tokens": _TOKENS,
    "added_tokens_overrides": _TOKENS,
    "hub_model_id": "publish the adapter with `lpeft publish ADAPTER_DIR ORG/NAME --registry hf`",
    "hub_strategy": "publish the adapter with `lpeft publish ADAPTER_DIR ORG/NAME --registry hf`",
    "dataset_prepared_path": "lightning-peft caches tokenized data itself ($LPEFT_DATA_CACHE)",
    "dataset_processes": "tokenization runs in the training process and is cached",
    "resume_from_checkpoint": "resume with `lpeft fit ... --ckpt_path PATH` (lightning-peft checkpoints only)",
    "auto_resume_from_checkpoints": "`lpeft fit ... --ckpt_path last` resumes from the newest checkpoint",
    "use_tensorboard": "TensorBoard logs are written whenever tensorboard is installed",
    "loraplus_lr_ratio": "LoRA+ (separate learning rates for A and B) is not supported",
    "loraplus_lr_embedding": "LoRA+ (separate learning rates for A and B) is not supported",
    "merge_lora": "merge after training with `lpeft merge ADAPTER_DIR --out DIR` (or the AdapterMerge callback)",
    "lora_on_cpu": "the adapter is built where Lightning places the model",
    "gradient_checkpointing_kwargs": "not configurable: transformers' defaults are used",
    "default_system_message": "conversations are rendered as the file holds them; add the system turn to the data",
    "eot_tokens": "turn ends come from the tokenizer's chat template and special tokens",
    "neftune_noise_alpha": "NEFTune embedding noise is not supported",
    "torch_compile": "torch.compile is not applied",
    "eval_table_size": _EVAL_GEN,
    "eval_max_new_tokens": _EVAL_GEN,
    "do_causal_lm_eval": _EVAL_GEN,
    "eval_causal_lm_metrics": _EVAL_GEN,
    "loss_watchdog_threshold": "there is no loss watchdog (an EarlyStopping callback can watch train_loss)",
    "loss_watchdog_patience": "there is no loss watchdog (an EarlyStopping callback can watch train_loss)",
    "save_safetensors": "adapters are always saved as safetensors",
    "save_total_limit": "without a monitored metric Lightning keeps the newest checkpoint (and `last`), or all",
    "rl": _RL,
    "pretraining_dataset": "streaming pre-training data is not supported; save it to a local file and use datasets",
    "plugins": "Axolotl plugins are not loaded",
    "unfrozen_parameters": "only the adapter trains (plus LoraConfig modules_to_save)",
    "fp8": "FP8 training is not supported",
    "gptq": "GPTQ bases are not supported; bases are quantized with bitsandbytes (load_in_4bit / load_in_8bit)",
    "adam_beta1": _ADAM,
    "adam_beta2": _ADAM,
    "adam_beta3": _ADAM,
    "adam_epsilon": _ADAM,
    "adam_epsilon2": _ADAM,
    "optim_args": _ADAM,
    "optim_target_modules": _ADAM,
    "lr_scheduler_kwargs": _SCHEDULE,
    "cosine_min_lr_ratio": _SCHEDULE,
    "cosine_constant_lr_ratio": _SCHEDULE,
    "lr_div_factor": _SCHEDULE,
    "lr_quadratic_warmup": _SCHEDULE,
    "embedding_lr": "one learning rate for every trainable parameter",
    "embedding_lr_scale": "one learning rate for every trainable parameter",
    "lr_groups": "one learning rate for every trainable parameter",
    "max_memory": "the base is placed by Lightning on the trainer's devices",
    "gpu_memory_limit": "the base is placed by Lightning on the trainer's devices",
    "device_map": "the base is placed by Lightning on the trainer's devices",
    "low_cpu_mem_usage": "the base is placed by Lightning on the trainer's devices",
    "sequence_parallel_degree": "sequence/context/tensor parallelism is not supported",
    "context_parallel_size": "sequence/context/tensor parallelism is not supported",
    "tensor_parallel_size": "sequence/context/tensor parallelism is not supported",
    "sample_packing_group_size": "packing is first-fit-decreasing over the whole data set",
    "sample_packing_bin_size": "packing is first-fit-decreasing over the whole data set",
    "sample_packing_sequentially": "packing is first-fit-decreasing over the whole data set",
    "multipack_real_batches": "packing is first-fit-decreasing over the whole data set",
    "dataset_exact_deduplication": "the data is used as the file holds it; deduplicate it beforehand",
    "include_tokens_per_second": "the RunSummary callback records tokens and time (run_summary.json)",
    "debug": "run `lpeft --debug fit ...` for tracebacks",
    "lora_mlp_kernel": _KERNELS,
    "lora_qkv_kernel": _KERNELS,
    "lora_o_kernel": _KERNELS,
    "cut_cross_entropy": _KERNELS,
    "chunked_cross_entropy": _KERNELS,
}
PREFIX_REASONS = (
    ("wandb_", "Weights & Biases logging is " + _LOGGER),
    ("mlflow_", "MLflow logging is " + _LOGGER),
    ("comet_", "Comet logging is " + _LOGGER),
    ("fsdp", _STRATEGY),
    ("ddp", "set trainer.strategy: ddp (or lightning_peft.strategies.DDP) for DDP"),
    ("unsloth_", _KERNELS),
    ("liger_", _KERNELS),
    ("flash_attn_", _KERNELS),
    ("dataloader_", "the data module sets up its dataloaders itself"),
    ("relora", "ReLoRA restarts are not supported"),
    ("dpo_", _RL),
    ("kto_", _RL),
    ("orpo_", _RL),
    ("rl_", _RL),
    ("trl", _RL),
    ("vllm", "vLLM is not used in training; check an adapter for vLLM with `lpeft inspect DIR --serving vllm`"),
    ("pose_", "PoSE context extension is not supported"),
    ("qat", "quantization-aware training is not supported"),
)
DATASET_REASONS = {
    "name": "a subset of a Hub data set, but the path is a local file, which has none",
    "revision": "a revision of a Hub data set, but the path is a local file, which has none",
    "shards": "the whole file is used; shard it beforehand",
    "shards_idx": "the whole file is used; shard it beforehand",
    "drop_system_message": "conversations are rendered as the file holds them; remove the system turns from the data",
    "message_field_training": "the loss is on every assistant turn; per-turn training flags are not read",
    "message_field_training_detail": "the loss is on every assistant turn; per-span training flags are not read",
    "field_tools": "only role and content are read from each message",
    "field_thinking": "only role and content are read from each message",
    "split_thinking": "only role and content are read from each message",
}
UNKNOWN = "no lightning-peft equivalent known to `lpeft convert`"
