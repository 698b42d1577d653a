"""`PeftCausalLM`: a thin LightningModule around a (quantizable) transformers causal LM with a PEFT adapter.

Subclass it and override the documented hooks — `load_base_model`, `build_adapter`, `compute_loss` — to change
how the base is loaded, how the adapter is built or what is optimized.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import torchmetrics
from lightning.pytorch.utilities import rank_zero_info
from peft import PeftConfig
from torch.nn.modules.module import _IncompatibleKeys
from typing_extensions import override

from lightning_peft import adapters, checkpointing, compiling, generation
from lightning_peft.architectures import ATTN_AUTO, supported_attn_implementations
from lightning_peft.data import chat_templates
from lightning_peft.errors import ConfigError
from lightning_peft.labels import IGNORE_INDEX
from lightning_peft.losses import chunked_lm_loss, chunking_blocker, next_token_cross_entropy, next_token_targets
from lightning_peft.models import (
    DEFAULT_MODEL,
    dtype_for_precision,
    load_base_model,
    load_tokenizer,
    packed_examples_are_isolated,
)
from lightning_peft.options import (
    QUANTIZATIONS,
    AttnImplementation,
    GradientCheckpointing,
    Optimizer,
    Quantization,
    Scheduler,
)
from lightning_peft.packed_attention import use_packed_attention
from lightning_peft.run_folder import run_dir
from lightning_peft.tokens import grow_embeddings, tokenizer_source, with_trainable_tokens

log = logging.getLogger(__name__)


class PeftCausalLM(L.LightningModule):
    """Fine-tune a causal LM with any PEFT method; checkpoints hold the adapter only.

    Args:
        model_name_or_path: A built-in alias (`smollm2-135m-instruct`), a local model folder or a Hub id.
        quantization: Load the frozen base in 4-bit (QLoRA: NF4 + double quantization) or 8-bit with
            bitsandbytes, or unquantized.
        quantization_options: Extra or overriding `transformers.BitsAndBytesConfig` arguments, e.g.
            `{bnb_4bit_quant_type: fp4}` or `{bnb_4bit_quant_storage: bfloat16}`.
        adapter: LoraConfig fields as a mapping (`{r: 16, lora_alpha: 32, use_dora: true}`), or
            `class_path`/`init_args` for any peft config (AdaLoraConfig, IA3Config, LoHaConfig, PromptTuningConfig
            ...). `target_modules` defaults to `all-linear`.
        learning_rate: Peak learning rate.
        weight_decay: AdamW weight decay, applied to matrices only.
        optimizer: `adamw` (torch), or bitsandbytes' `adamw_8bit`, `paged_adamw`, `paged_adamw_8bit`.
        lr_scheduler: Shape of the schedule after warmup.
        warmup_steps: Linear warmup steps; overrides `warmup_ratio` when positive.
        warmup_ratio: Warmup as a fraction of all optimizer steps.
        gradient_checkpointing: Recompute activations in the backward pass to save memory. `true`: every
            decoder layer keeps only its input (the least memory; the whole forward runs twice). `selective`:
            each layer's MLP keeps only its input and recomputes its gate/up projections, activation and product
            (most of a layer's activations, at a fraction of the recompute; gated MLPs such as Llama's, others
            fall back to `true`). `false`: nothing is recomputed.
        loss_chunk_size: Compute the loss from the decoder's hidden states, at most this many supervised tokens
            per lm_head call, so the (batch, time, vocab) logits never exist (`lightning_peft.losses`). Chunks
            are recomputed in backward only when a batch has more supervised tokens than this. 0 or null: full
            logits. Not used by a subclass that overrides `compute_loss` (it gets full logits), under FSDP2, or
            for a model whose logits are not its lm_head's output.
        attn_implementation: The transformers attention backend. `auto`: the best one the model class
            implements (sdpa where it can, else eager: GPT-Neo, BLOOM, Gemma 2), and with `data.packing` an sdpa
            model attends packed rows one document at a time (`lightning_peft.packed_attention`: memory linear
            in the row length). `sdpa` keeps transformers' block-diagonal (T x T) mask for packed rows. A backend
            the class does not implement is refused before loading.
        compile: torch.compile each decoder layer (regional compilation: one graph for the repeated layer, LoRA
            included, shapes dynamic so packed and padded batches of any length reuse it) while training;
            evaluation and generation stay eager. The first steps pay the compile (tens of seconds). Off by
            default: on an AVX-512 CPU a SmolLM2 step was only 1.09x faster, which short runs do not earn back
            (docs/performance.md, "Compile and precision").
        revision: Model revision when loading from the Hub.
        trust_remote_code: Allow model code from the Hub (only for models you trust).
        adapter_path: Start from this saved PEFT adapter folder (a previous run's `adapter/`, or any PEFT
            adapter) instead of a new one: to continue training it, or to validate/test/predict with it.
            Its own adapter_config.json then defines the adapter, so `adapter` must be left unset. A package
            from `lpeft pull` is checked against the base's fingerprint first.
        allow_base_mismatch: Load an `adapter_path` package onto a base whose fingerprint differs from the one
            it was trained on (a warning instead of an error).
        adapter_dir: Where the final adapter goes at the end of fit; default `<run folder>/adapter`, the run's own
            folder whatever the loggers (`lightning_peft.run_folder`).
        save_adapter_on_fit_end: Write the final adapter (plain PEFT format) when fit ends.
        chat_template: The chat template (a built-in name, a Jinja string or a .jinja file); the `lpeft` CLI
            sets it from `data.chat_template`. Special tokens it writes that the vocabulary lacks are added to the
            tokenizer, the embeddings (and an untied lm_head) grow by as many rows, and only those rows are
            trained, through PEFT's trainable tokens (LoRA's `trainable_token_indices`): the base's weights never
            change. The tokenizer saved with the adapter carries the template and the tokens.
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        quantization: Quantization = "none",
        quantization_options: dict[str, Any] | None = None,
        adapter: PeftConfig | dict[str, Any] | None = None,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        optimizer: Optimizer = "adamw",
        lr_scheduler: Scheduler = "cosine",
        warmup_steps: int = 0,
        warmup_ratio: float = 0.0,
        gradient_checkpointing: GradientCheckpointing = False,
        loss_chunk_size: int | None = 1024,
        attn_implementation: AttnImplementation | None = ATTN_AUTO,
        compile: bool = False,
        revision: str | None = None,
        trust_remote_code: bool = False,
        adapter_path: str | None = None,
        allow_base_mismatch: bool = False,
        adapter_dir: str | None = None,
        save_adapter_on_fit_end: bool = True,
        chat_template: str | None = None,
    ) -> None:
        super().__init__()
        if adapter_path is not None and adapter is not None:
            raise ConfigError(
                f"`adapter` and `adapter_path`={adapter_path!r} were both given; the saved adapter's own config is "
                "used with adapter_path, so drop `adapter`."
            )
        if adapter_path is not None:
            self.peft_config = adapters.read_adapter_config(adapter_path)
        else:
            self.peft_config = adapters.build_peft_config(adapter)
        _validate(locals())
        if chat_template is not None:
            chat_templates.resolve(chat_template)  # a bad name or file fails here, before any loading
        self.save_hyperparameters(ignore=["adapter"])
        # Checkpoints reload hparams: keep the adapter as plain data, never a pickled peft object.
        self.hparams["adapter"] = None if adapter_path else adapters.config_to_dict(self.peft_config)
        self.model: Any = None
        self.tokenizer: Any = None
        self._chunked_loss_ok: bool | None = None  # decided on first use (losses.chunking_blocker)
        self.train_loss, self.train_acc = torchmetrics.MeanMetric(), torchmetrics.MeanMetric()
        self.val_loss, self.val_acc = torchmetrics.MeanMetric(), torchmetrics.MeanMetric()
        self.test_loss, self.test_acc = torchmetrics.MeanMetric(), torchmetrics.MeanMetric()

    # ---- hooks meant to be overridden ------------------------------------------------------------------------

    def load_base_model(self) -> torch.nn.Module:
        """Load the frozen base model. Override to load it differently (another class, extra kwargs ...)."""
        hp = self.hparams
        return load_base_model(
            hp.model_name_or_path,
            quantization=hp.quantization,
            quantization_options=hp.quantization_options,
            dtype=self.base_dtype,
            attn_implementation=hp.attn_implementation,
            revision=hp.revision,
            trust_remote_code=hp.trust_remote_code,
        )

    def build_adapter(self, base_model: torch.nn.Module) -> torch.nn.Module:
        """Wrap the base in a PEFT model. Override to add adapters, freeze more or inject differently."""
        quantized = self.hparams.quantization != "none"
        if self.hparams.adapter_path is not None:
            from lightning_peft.hub import check_base

            check_base(
                self.hparams.adapter_path, self.hparams.model_name_or_path, force=self.hparams.allow_base_mismatch
            )
            base_model = adapters.prepare_base(
                base_model, quantized=quantized, gradient_checkpointing=self.hparams.gradient_checkpointing
            )
            return adapters.load_adapter(base_model, self.hparams.adapter_path, is_trainable=True)
        max_steps = self._trainer.max_steps if self._trainer is not None else None
        config = adapters.fill_total_step(self.peft_config, max_steps)  # AdaLoRA needs its schedule length up front
        return adapters.inject_adapter(
            base_model,
            config,
            quantized=quantized,
            gradient_checkpointing=self.hparams.gradient_checkpointing,
        )

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy over supervised tokens (labels != -100). Override for another loss.

        Args:
            logits: (batch, time, vocab) model outputs.
            labels: (batch, time) target ids, not shifted; -100 marks tokens without loss.
            batch: the whole batch, for losses that need more (weights, rewards ...).
        """
        return next_token_cross_entropy(logits, labels)

    # ---- model construction --------------------------------------------------------------------------------

    @property
    def base_dtype(self) -> torch.dtype:
        """Dtype of the frozen weights and the 4-bit compute: follows the trainer's precision (fp32 on CPUs)."""
        precision = self._trainer.precision if self._trainer is not None else None
        return dtype_for_precision(precision)

    @override
    def configure_model(self) -> None:
        """Load the base and inject the adapter once; Lightning calls this inside the strategy's context."""
        if self.model is not None:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(
            tokenizer_source(hp.model_name_or_path, hp.adapter_path),
            revision=hp.revision,
            trust_remote_code=hp.trust_remote_code,
        )
        new_tokens = chat_templates.apply_chat_template(self.tokenizer, hp.get("chat_template"))
        base = self.load_base_model()
        # The template's new tokens (and those of an adapter_path trained with them) need rows of their own.
        grow_embeddings(base, len(self.tokenizer))
        if new_tokens:
            self._train_new_tokens(base, chat_templates.added_token_ids(self.tokenizer, new_tokens))
        self.model = self.build_adapter(base)
        if hp.gradient_checkpointing == checkpointing.SELECTIVE:
            checkpointing.recompute_adapter_dropout(self.model)
        # from_pretrained returns the base in eval mode; adapter dropout must be active while training.
        self.model.train()
        if self._device_mesh is not None:  # Lightning's ModelParallelStrategy: FSDP2 (strategies.FSDP2)
            from lightning_peft.strategies import shard_decoder_layers

            options = getattr(self.trainer.strategy, "shard_options", {})
            shard_decoder_layers(self.model, self._device_mesh["data_parallel"], **options)
        if hp.get("compile"):
            compiling.compile_decoder_layers(self.model)

    def _train_new_tokens(self, base: torch.nn.Module, token_ids: list[int]) -> None:
        if self.hparams.adapter_path is not None:
            raise ConfigError(
                f"`data.chat_template`={self.hparams.chat_template!r} adds tokens that the tokenizer of "
                f"`adapter_path`={self.hparams.adapter_path!r} lacks, and a saved adapter cannot gain trainable "
                "rows; leave data.chat_template unset to use the adapter's own template, or train a new adapter."
            )
        self.peft_config = with_trainable_tokens(self.peft_config, base, token_ids)
        rank_zero_info(f"`data.chat_template`: training the embedding rows of the new tokens {token_ids} only.")

    # ---- steps -------------------------------------------------------------------------------------------------

    @override
    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        # The KV cache would make packed examples attend to each other (NOTES.md): always off in training.
        return self.model(**_model_inputs(batch), use_cache=False)

    def _shared_step(self, batch: dict[str, torch.Tensor], loss_metric, acc_metric) -> torch.Tensor:
        labels = batch["labels"]
        if self._uses_chunked_loss():
            chunked = chunked_lm_loss(self.model, _model_inputs(batch), labels, self.hparams.loss_chunk_size)
            loss, n_tokens, correct = chunked.loss, chunked.n_tokens, chunked.correct
        else:
            # Prompt tuning and P-tuning return logits for their virtual tokens too: keep the real positions.
            logits = self(batch).logits[:, -labels.shape[1] :]
            loss = self.compute_loss(logits, labels, batch)
            targets = next_token_targets(labels)
            supervised = targets != IGNORE_INDEX
            n_tokens = supervised.sum()
            correct = ((logits.argmax(-1) == targets) & supervised).sum()
        loss_metric.update(loss.detach(), weight=n_tokens)
        acc_metric.update(correct / n_tokens.clamp(min=1), weight=n_tokens)
        return loss

    def _uses_chunked_loss(self) -> bool:
        """Chunked loss when `loss_chunk_size` is set, `compute_loss` is the built-in one and the model allows it."""
        if not self.hparams.get("loss_chunk_size") or type(self).compute_loss is not PeftCausalLM.compute_loss:
            return False
        if self._chunked_loss_ok is None:
            blocker = chunking_blocker(self.model, self.device)
            if blocker is not None:
                rank_zero_info(f"`loss_chunk_size`: computing the loss from full logits, because {blocker}.")
            self._chunked_loss_ok = blocker is None
        return self._chunked_loss_ok

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, self.train_loss, self.train_acc)
        self.log("train_loss", loss.detach(), prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        penalty = adapters.adapter_regularization(self.model)
        return loss if penalty is None else loss + penalty

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, self.val_loss, self.val_acc)

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, self.test_loss, self.test_acc)

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Generate a completion for each left-padded prompt of a batch (`SFTDataModule(predict_file=...)`).

        Generation settings are the `generate` arguments in the attribute `generation_kwargs`, which
        `lightning_peft.callbacks.PredictionWriter` sets from its own arguments when prediction starts (they are
        not hyperparameters: they do not change the trained model). Without it: greedy, up to 128 new tokens.

        Returns:
            One dict per row: `index` (the row of the predict file), `prompt` (the prompt tokens as text, special
            tokens included), `completion` (the new tokens as text, special tokens skipped) and `reference` when
            the batch holds the row's answer.
        """
        settings = generation.prediction_settings(self.tokenizer, self.model, getattr(self, "generation_kwargs", {}))
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask", torch.ones_like(input_ids))
        pad = self.tokenizer.pad_token_id
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pad_token_id=self.tokenizer.eos_token_id if pad is None else pad,
            **settings,
        )
        return generation.prediction_rows(self.tokenizer, batch, attention_mask, output[:, input_ids.shape[1] :])

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_eval("val", self.val_loss, self.val_acc)

    @override
    def on_test_epoch_end(self) -> None:
        self._log_eval("test", self.test_loss, self.test_acc)

    def _log_eval(self, stage: str, loss_metric, acc_metric) -> None:
        # MeanMetric.compute() already reduces across processes, token-weighted.
        loss = loss_metric.compute()
        metrics = {
            f"{stage}_loss": loss,
            f"{stage}_ppl": torch.exp(loss),
            f"{stage}_acc": acc_metric.compute(),
        }
        self.log_dict(metrics, prog_bar=True, sync_dist=True)
        loss_metric.reset()
        acc_metric.reset()

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # AdaLoRA reallocates ranks after each optimizer step while the gradients are still there. Not in
        # on_before_zero_grad: Lightning runs that between forward and backward, where masking weights in place
        # would break autograd.
        allocate = getattr(self.model.base_model, "update_and_allocate", None)
        if allocate is not None and self.global_step != getattr(self, "_allocated_at_step", 0):
            self._allocated_at_step = self.global_step
            allocate(self.global_step - 1)

    # ---- optimization ------------------------------------------------------------------------------------------

    @override
    def configure_optimizers(self) -> Any:
        from lightning_peft.optim import build_optimizer, build_scheduler

        hp = self.hparams
        optimizer = build_optimizer(hp.optimizer, self.model, hp.learning_rate, hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = hp.warmup_steps or math.ceil(hp.warmup_ratio * total)
        scheduler = build_scheduler(hp.lr_scheduler, optimizer, warmup, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints: the adapter only ----------------------------------------------------------------------

    def adapter_state_keys(self) -> set[str]:
        """Keys of this module's `state_dict` that belong to the adapter (everything else is the frozen base)."""
        return {f"model.{k}" for k in adapters.adapter_state_keys(self.model)}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.adapter_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    @override
    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load an adapter-only state dict; with `strict`, every adapter tensor must be there (the base never is)."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        adapter_keys = self.adapter_state_keys()
        missing = [k for k in result.missing_keys if k in adapter_keys]
        if strict and (missing or result.unexpected_keys):
            raise ConfigError(
                f"The checkpoint does not fit this adapter: missing {missing[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}; resume with the same `model.adapter` settings it was trained with."
            )
        return _IncompatibleKeys(missing, result.unexpected_keys)

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    @override
    def on_fit_start(self) -> None:
        trainable, total = adapters.count_parameters(self.model)
        if self.trainer.is_global_zero:
            log.info(
                "%s on %s: trainable params %s of %s (%.4f%%)",
                type(self.peft_config).__name__,
                self.hparams.model_name_or_path,
                f"{trainable:,}",
                f"{total:,}",
                100 * trainable / max(total, 1),
            )
        datamodule = getattr(self.trainer, "datamodule", None)
        if getattr(datamodule, "packing", False):
            self.use_packed_attention()
            self.check_packing_isolation()

    @override
    def on_fit_end(self) -> None:
        if self.hparams.save_adapter_on_fit_end:
            self.final_adapter_dir = self.save_adapter(self.hparams.adapter_dir or run_dir(self.trainer) / "adapter")

    def save_adapter(self, directory: str | Path) -> Path:
        """Write the adapter in plain PEFT format (with the tokenizer) from global rank zero; return the folder.

        Under FSDP every rank must call it: the sharded adapter is gathered first (`strategies.gathered_adapter_state`).
        """
        directory = Path(directory)
        from lightning_peft.strategies import gathered_adapter_state, save_gathered_adapter

        state = gathered_adapter_state(self)  # FSDP: a collective on every rank (None when nothing is sharded)
        if self._trainer is None or self.trainer.is_global_zero:
            if state is None:
                adapters.save_adapter(self.model, directory, self.tokenizer)
            else:
                save_gathered_adapter(self.model, directory, self.tokenizer, state)
            log.info("Adapter saved to %s", directory)
        return directory

    def use_packed_attention(self) -> bool:
        """Attend packed rows one document at a time (`lightning_peft.packed_attention`), where the model allows it.

        Fit calls it when `data.packing` is on; without it, transformers' sdpa path keeps a (T x T) mask per layer
        for backward. Prompt learning keeps its backend (its virtual tokens need the mask), and so does an explicit
        `attn_implementation`. Returns whether it switched.
        """
        if adapters.is_prompt_learning(self.peft_config) or self.hparams.attn_implementation not in (None, ATTN_AUTO):
            return False
        return use_packed_attention(self.model)

    def check_packing_isolation(self) -> None:
        """Refuse packing when this model/backend lets packed examples see each other.

        Two examples are packed twice, with the first one changed: the second one's logits must not move. Eager
        attention keeps them apart in most families; BLOOM's ALiBi attention ignores position_ids entirely.
        """
        if packed_examples_are_isolated(self.model, device=self.device):
            return
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        backend = getattr(base.config, "_attn_implementation", None) or self.hparams.attn_implementation
        # Prompt learning leaks through its virtual tokens whatever the backend; only a backend change can help LoRA.
        others = [] if adapters.is_prompt_learning(self.peft_config) else supported_attn_implementations(type(base))
        others = [name for name in others if name != backend]
        fix = f" or set `model.attn_implementation` to one of {', '.join(others)}" if others else ""
        raise ConfigError(
            f"`data.packing: true` is not safe with {type(base).__name__} (attn_implementation={backend!r}, "
            f"{type(self.peft_config).__name__}): packed examples attend to each other. Set `data.packing: false`"
            f"{fix}."
        )

    @torch.no_grad()
    def evaluate(self, dataloader: Any) -> dict[str, float]:
        """Loss, perplexity and token accuracy over `dataloader`, outside the Trainer loops (used for reports)."""
        loss, acc = torchmetrics.MeanMetric().to(self.device), torchmetrics.MeanMetric().to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in dataloader:
                self._shared_step({k: v.to(self.device) for k, v in batch.items()}, loss, acc)
        finally:
            self.model.train(was_training)
        mean_loss = float(loss.compute())
        return {"loss": mean_loss, "ppl": math.exp(mean_loss), "acc": float(acc.compute())}

    @torch.no_grad()
    def generate(self, prompt: str | list[dict[str, str]], max_new_tokens: int = 64, **kwargs: Any) -> str:
        """Generate a reply to `prompt` (plain text, or chat messages rendered with the chat template); greedy by default."""
        self.configure_model()
        return generation.generate_reply(self.model, self.tokenizer, prompt, self.device, max_new_tokens, **kwargs)


def _validate(args: dict[str, Any]) -> None:
    """Check every scalar setting at once so a config with several mistakes is fixed in one go."""
    problems = []
    if not args["learning_rate"] > 0:
        problems.append(f"`learning_rate`={args['learning_rate']!r} must be > 0")
    if args["weight_decay"] < 0:
        problems.append(f"`weight_decay`={args['weight_decay']!r} must be >= 0")
    if args["warmup_steps"] < 0:
        problems.append(f"`warmup_steps`={args['warmup_steps']!r} must be >= 0")
    if not 0 <= args["warmup_ratio"] < 1:
        problems.append(f"`warmup_ratio`={args['warmup_ratio']!r} must be in [0, 1)")
    if args["loss_chunk_size"] is not None and args["loss_chunk_size"] < 0:
        problems.append(f"`loss_chunk_size`={args['loss_chunk_size']!r} must be >= 0 (0 or null: no chunking)")
    if problem := checkpointing.setting_problem(args["gradient_checkpointing"]):
        problems.append(problem)
    if problem := compiling.setting_problem(args["compile"]):
        problems.append(problem)
    elif args["compile"] is True and args["gradient_checkpointing"] is True:
        # Dynamo does not trace inside a whole-layer checkpoint: the layers would run eager without a word.
        problems.append(
            "`compile`=true with `gradient_checkpointing`=true would run the layers uncompiled (torch.compile does "
            "not trace inside a checkpointed layer); use gradient_checkpointing 'selective' or false, or compile false"
        )
    if args["quantization"] not in QUANTIZATIONS:
        problems.append(f"`quantization`={args['quantization']!r} must be one of {', '.join(QUANTIZATIONS)}")
    if problems:
        raise ConfigError("; ".join(problems) + ".")


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch entries the model takes (labels stay out: the loss is computed here)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
