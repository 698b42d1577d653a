"""`SFTDataModule`: supervised fine-tuning data from files or Hub data sets to padded or packed batches.

`setup()` reads, renders and tokenizes each source (or loads it from the cache) on every rank, mixes the sources of
`train_datasets`, splits off the validation examples and builds the datasets; the dataloaders then only pad. See
`sources.py` for how a source is written, `collate.py` for the batch format.
`setup("predict")` reads only `predict_file`: the prompts, rendered by the same formats, left-padded for generation.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_peft.data.arguments import validate_arguments
from lightning_peft.data.chat_templates import apply_chat_template
from lightning_peft.data.collate import (
    LengthGroupedSampler,
    PromptCollator,
    ResumableDataLoader,
    SFTCollator,
    ShuffleSampler,
)
from lightning_peft.data.hub_datasets import load_hub_dataset
from lightning_peft.data.mixing import mix, planned_count
from lightning_peft.data.packing import ExampleDataset, PackedDataset, PromptDataset
from lightning_peft.data.preparation import prepare_file
from lightning_peft.data.readers import require_exists
from lightning_peft.data.sources import DataSource, describe
from lightning_peft.data.tokenization import TokenizedPrompts, prepare_prompts
from lightning_peft.data.tokenized import TokenizedData
from lightning_peft.errors import ConfigError, DataError
from lightning_peft.options import DataFormat

log = logging.getLogger(__name__)

Source = str | dict[str, Any]
# The role each single-source setting's data plays in a run (train_datasets entries are all "train").
_ROLES = {"train_file": "train", "val_file": "validation", "test_file": "test"}


class SFTDataModule(LightningDataModule):
    """Supervised fine-tuning data: chat messages, prompt/completion pairs, Alpaca records or plain text.

    Batches are dicts of (B, T) int64 tensors: `input_ids`, `labels` (-100 where no loss is taken, not shifted),
    and `attention_mask` for padded batches or `position_ids` (restarting at 0 for each example, no mask) for
    packed ones. Prediction batches are left-padded prompts: `input_ids`, `attention_mask`, `index` (each
    prompt's row in `predict_file`) and `reference` (each row's answer, or None), see `PromptCollator`.

    Args:
        train_file: the training data: a JSON Lines, JSON, CSV or Parquet file, a folder written by
            `datasets`' `save_to_disk` (its "train" split if it holds several), or a Hugging Face Hub data set:
            `ORG/NAME` (when no such local path exists), `hf://datasets/ORG/NAME[@REVISION]`, or a mapping
            {path, name (subset), split, revision, data_files, format, columns} as Axolotl's `datasets:` entries.
            A Hub id reads its "train" split (val_file: "validation", test_file and predict_file: "test") unless
            `split` says otherwise. Needed by fit, validate and test; `predict` reads only `predict_file`.
        val_file: the validation data, in any of the same forms.
        val_fraction: hold out this fraction of `train_file` (a seeded split) when there is no `val_file`.
        format: how records become text: "messages" (chat, rendered with the chat template, loss on
            the assistant turns), "prompt_completion" (loss on the completion), "alpaca" (instruction, optional
            input, output; loss on the output), "text" (plain language modelling), or "auto" to detect it.
        columns: our field name -> the file's column, e.g. {"messages": "conversations", "prompt": "question"}.
            Fields: messages, prompt, completion, instruction, input, output, text.
        roles: the data's role names -> the standard roles (system, user, assistant, tool), e.g.
            {"human": "user", "bot": "assistant"}. ShareGPT's human and gpt are understood without it; a message
            with any other role is an error naming the row. The loss is taken on the turns mapped to assistant.
        max_length: the longest example, and with packing the longest packed row, in tokens.
        truncation: cut longer examples to `max_length` (counted and logged); false makes them an error.
        train_on_prompt: take the loss on every token (system, user and prompt text too), not only the answers.
        packing: pack several examples into each row of up to `max_length` tokens, without cross-attention.
        group_by_length: batch examples of similar length together (seeded), to pad less.
        batch_size: examples (or packed rows) per training batch.
        val_batch_size: per validation and prediction batch; default `batch_size`.
        num_workers: dataloader worker processes.
        num_proc: processes that read, render and tokenize the data when it is not in the cache yet; default: the
            CPU cores available. Only one process per machine prepares (DDP ranks wait for its cache entry); the
            result does not depend on it.
        seed: seed of the validation split and of the shuffles.
        tokenizer: the tokenizer's model name or path (given to `lightning_peft.models.load_tokenizer`); from
            Python a tokenizer object is accepted too. The `lpeft` CLI links it to `model.model_name_or_path`.
        chat_template: the chat template that renders conversations (`messages`, conversational
            prompt/completion, predict prompts): null keeps the tokenizer's own; a built-in name (chatml, gemma,
            llama3, mistral, phi3, qwen2), a Jinja string, or the path of a .jinja file. Special tokens it writes
            that the vocabulary lacks (`<|im_start|>` for chatml on a base Llama) are added to the tokenizer; the
            `lpeft` CLI hands the setting to the model, which trains only those new embedding rows (PEFT's
            trainable tokens) and saves the tokenizer, template included, with the adapter. A tokenizer object
            given is changed in place.
        cache: keep tokenized data on disk (`$LPEFT_DATA_CACHE`) and reuse it when nothing changed.
        test_file: the data `lpeft test` (`Trainer.test`) measures, in any of the file forms and formats above.
        predict_file: prompts to complete with `lpeft predict` (`Trainer.predict`), in any of the file forms,
            formats and column mappings above. Each row gives its prompt only: a conversation without its final
            assistant turn (or the whole conversation when it ends with another role) with the chat template's
            generation prompt, the prompt of a prompt/completion row, the Alpaca prompt up to "### Response:", or
            the text itself. Answer fields are optional; when present they are kept as each row's `reference`.
            A prompt longer than `max_length` keeps its last `max_length` tokens if `truncation` is on (counted and
            logged), else is an error. Generation settings belong to `lightning_peft.callbacks.PredictionWriter`.
        train_datasets: instead of `train_file`, several training sources mixed into one (seeded by `seed`): a
            list of the same forms, where a mapping may set its own `format`, `columns` and `roles` and either `weight` (a
            multiplier of its size: 0.5 half, 2 twice) or `count` (exactly this many examples); see `mixing.py`.
    """

    def __init__(
        self,
        train_file: Source | None = None,
        val_file: Source | None = None,
        val_fraction: float | None = None,
        format: DataFormat = "auto",
        columns: dict[str, str] | None = None,
        roles: dict[str, str] | None = None,
        max_length: int = 512,
        truncation: bool = True,
        train_on_prompt: bool = False,
        packing: bool = False,
        group_by_length: bool = True,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        tokenizer: str | None = None,
        chat_template: str | None = None,
        cache: bool = True,
        predict_file: Source | None = None,
        test_file: Source | None = None,
        train_datasets: list[Source] | None = None,
        num_proc: int | None = None,
    ) -> None:
        super().__init__()
        # The sources as parsed: `sources` by setting name, `mixture` the entries of train_datasets.
        self.sources, self.mixture = validate_arguments(
            train_file=train_file,
            predict_file=predict_file,
            test_file=test_file,
            train_datasets=train_datasets,
            val_file=val_file,
            val_fraction=val_fraction,
            format=format,
            columns=columns,
            roles=roles,
            max_length=max_length,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            num_proc=num_proc,
            chat_template=chat_template,
        )
        # A tokenizer object is not a hyperparameter (and should not be pickled into checkpoints); its name is.
        self.save_hyperparameters(ignore=None if tokenizer is None or isinstance(tokenizer, str) else ["tokenizer"])
        self.train_file, self.val_file = _str_or_none(train_file), _str_or_none(val_file)
        self.predict_file, self.test_file = _str_or_none(predict_file), _str_or_none(test_file)
        self.train_datasets = list(train_datasets) if train_datasets else None
        self.val_fraction = val_fraction
        self.format, self.columns, self.roles = format, dict(columns or {}), dict(roles or {})
        self.max_length, self.truncation, self.train_on_prompt = max_length, truncation, train_on_prompt
        self.packing, self.group_by_length = packing, group_by_length
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.seed, self.cache, self.num_proc = num_workers, seed, cache, num_proc
        self.chat_template = chat_template
        self._templated: Any = None  # the tokenizer `chat_template` was applied to
        self.tokenizer_name = tokenizer if isinstance(tokenizer, str) else None
        self._tokenizer: Any = None if tokenizer is None or isinstance(tokenizer, str) else tokenizer
        self.stats: dict[str, dict[str, Any]] = {}
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self.predict_dataset: PromptDataset | None = None
        if val_file is None and val_fraction is None:
            # Lightning looks the hook up on the instance: None reads as "no validation data", so the validation
            # loop is skipped with a clear message instead of a warning about an empty dataloader.
            self.val_dataloader = None  # type: ignore[assignment]

    @property
    def tokenizer(self) -> Any:
        """The tokenizer: the object given, or the one `tokenizer` names (loaded on first use), else None."""
        if self._tokenizer is None and self.tokenizer_name:
            from lightning_peft.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        self.set_tokenizer(tokenizer)

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use this tokenizer object (before `setup`); the `tokenizer` name, if any, is then ignored."""
        prepared = self.train_dataset is not None or self.predict_dataset is not None
        if prepared and tokenizer is not self._tokenizer:
            raise ConfigError("`tokenizer` cannot change after setup(): the data is already tokenized with another.")
        self._tokenizer = tokenizer

    @property
    def data_sources(self) -> list[dict[str, Any]]:
        """Each source of this data module with the role it plays (train, validation, test), as
        `sources.describe` records it: what `RunSummary` writes and the model card declares."""
        roles = [("train", s) for s in self.mixture]
        roles += [(role, self.sources[key]) for key, role in _ROLES.items() if key in self.sources]
        return [describe(source, role) for role, source in roles]

    @property
    def collator(self) -> SFTCollator:
        """The batch collator (pads with the tokenizer's pad token, else its EOS; padding is masked anyway)."""
        return SFTCollator(pad_token_id=self._pad_token_id())

    @property
    def predict_collator(self) -> PromptCollator:
        """The prediction collator: left padding with the tokenizer's pad token, else its EOS (masked anyway)."""
        return PromptCollator(pad_token_id=self._pad_token_id())

    def _pad_token_id(self) -> int:
        tokenizer = self._require_tokenizer()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return int(pad or 0)

    @override
    def setup(self, stage: str | None = None) -> None:
        """Build what `stage` needs, once: the prompts for "predict", else the training and validation data.

        With `stage` None (a direct call), every file given is prepared.
        """
        wants_predict = stage == "predict" or (stage is None and self.predict_file is not None)
        wants_test = stage == "test" or (stage is None and self.test_file is not None)
        if wants_predict:
            self._setup_predict()
        if wants_test:
            self._setup_test()
        if stage in ("fit", "validate") or (stage is None and (self.train_file or self.train_datasets) is not None):
            self._setup_train(stage or "fit")

    def _setup_test(self) -> None:
        if self.test_dataset is not None:
            return
        if self.test_file is None:
            raise ConfigError(
                "`test_file`=None: testing needs its own data; set data.test_file, e.g. "
                "`lpeft test --config run.yaml --data.test_file test.jsonl` (or use `lpeft validate`)."
            )
        source = self.sources["test_file"]
        test = self._prepare(source)
        self.stats["test"] = self._report("test", test, source.label)
        self.test_dataset = self._dataset(test, "test", shuffle=False)

    def _setup_train(self, stage: str) -> None:
        if self.train_dataset is not None:
            return
        if self.train_file is None and not self.mixture:
            raise ConfigError(
                f"`train_file`=None: {stage} needs the training data (and its validation split); "
                "set data.train_file to a data file or Hub data set (or data.train_datasets to several)."
            )
        train, train_label = self._prepare_train()
        val_source = self.sources.get("val_file")
        val = self._prepare(val_source) if val_source else None
        if self.val_fraction is not None:
            train, val = split_train_val(train, self.val_fraction, self.seed, train_label)
        elif val is not None and val.format != train.format:
            _warn("The training data is in format %r but the validation data in %r", train.format, val.format)
        self.stats["train"] = self._report("train", train, train_label)
        self.train_dataset = self._dataset(train, "train", shuffle=True)
        if val is not None:
            self.stats["val"] = self._report("val", val, val_source.label if val_source else train_label)
            self.val_dataset = self._dataset(val, "val", shuffle=False)

    def _prepare_train(self) -> tuple[TokenizedData, str]:
        """The training data and how to name it: one source, or the mixture of `train_datasets`."""
        if not self.mixture:
            source = self.sources["train_file"]
            return self._prepare(source), source.label
        parts = []
        for i, source in enumerate(self.mixture):
            parts.append(self._prepare(source))
            self.stats[f"train_datasets[{i}]"] = self._report(f"train_datasets[{i}]", parts[-1], source.label)
        mixed = mix(parts, self.mixture, self.seed)
        shares = (f"{s.label}: {planned_count(s, len(p))}" for s, p in zip(self.mixture, parts, strict=True))
        _info("train: mixed %d examples (%s)", len(mixed), ", ".join(shares))
        return mixed, f"the mixture of {len(parts)} data sets (data.train_datasets)"

    def _setup_predict(self) -> None:
        if self.predict_dataset is not None:
            return
        if self.predict_file is None:
            raise ConfigError(
                "`predict_file`=None: predicting needs a file of prompts; set data.predict_file, e.g. "
                "`lpeft predict --config run.yaml --data.predict_file prompts.jsonl`, or "
                "SFTDataModule(predict_file=...) from Python."
            )
        source = self.sources["predict_file"]
        path = source.label
        prompts = prepare_prompts(
            load_hub_dataset(source).records() if source.hub else str(require_exists(source.path, source.setting)),
            fmt=source.format or self.format,
            columns=self.columns if source.columns is None else source.columns,
            roles=self.roles if source.roles is None else source.roles,
            max_length=self.max_length,
            truncation=self.truncation,
            tokenizer=self._require_tokenizer(),
        )
        self.stats["predict"] = self._report_prompts(prompts, path)
        # Longest first: less padding per batch, and memory problems show at once; `index` restores file order.
        self.predict_dataset = PromptDataset(prompts, np.argsort(-prompts.lengths, kind="stable"))

    @override
    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the order follows from (seed, epoch), and a resumed run continues mid-epoch.

        See `ResumableDataLoader`: Lightning saves the position in the data in every checkpoint.
        """
        dataset = self._require_setup(self.train_dataset)
        if self.group_by_length:
            lengths = dataset.lengths  # type: ignore[attr-defined]
            sampler = LengthGroupedSampler(lengths, self.batch_size, seed=self.seed)
        else:
            sampler = ShuffleSampler(len(dataset), seed=self.seed)  # type: ignore[arg-type]
        return self._loader(dataset, self.batch_size, sampler=sampler, loader_class=ResumableDataLoader)

    @override
    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in a fixed order, longest first."""
        if self.val_dataset is None:
            self._require_setup(self.train_dataset)
            return []
        return self._loader(self.val_dataset, self.val_batch_size, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order, longest first."""
        if self.test_dataset is None:
            raise RuntimeError("SFTDataModule.setup('test') must run before test_dataloader().")
        return self._loader(self.test_dataset, self.val_batch_size, shuffle=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        """Left-padded prompt batches of `val_batch_size`, longest first (each carries its rows' `index`)."""
        if self.predict_dataset is None:
            raise RuntimeError("SFTDataModule.setup('predict') must run before predict_dataloader().")
        return self._loader(self.predict_dataset, self.val_batch_size, shuffle=False, collate_fn=self.predict_collator)

    def _loader(
        self, dataset: Dataset, batch_size: int, loader_class: type[DataLoader] = DataLoader, **kwargs: Any
    ) -> DataLoader:
        if "collate_fn" not in kwargs:
            kwargs["collate_fn"] = self.collator
        return loader_class(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            # The loader's own generator seeds its workers: creating an iterator never draws from the global torch
            # RNG, so dropout masks do not depend on when loaders were (re)created, as after a resume.
            generator=torch.Generator().manual_seed(self.seed),
            **kwargs,
        )

    def _prepare(self, source: DataSource) -> TokenizedData:
        """Read, render and tokenize one source (a local file, or a Hub data set loaded through `datasets`)."""
        fmt = source.format or self.format
        if source.hub:
            hub = load_hub_dataset(source)
            path, read, digest = source.label, hub.records, hub.digest()
        else:
            path, read, digest = str(require_exists(source.path, source.setting)), None, None
        data = prepare_file(
            path,
            fmt=fmt,
            columns=self.columns if source.columns is None else source.columns,
            roles=self.roles if source.roles is None else source.roles,
            max_length=self.max_length,
            truncation=self.truncation,
            train_on_prompt=self.train_on_prompt,
            tokenizer=self._require_tokenizer(),
            cache=self.cache,
            read=read,
            digest=digest,
            num_proc=self.num_proc,
            progress=getattr(rank_zero_only, "rank", 0) == 0,
        )
        if fmt == "auto":
            _info("Detected the data format %r in %s", data.format, path)
        return data

    def _dataset(self, data: TokenizedData, split_name: str, shuffle: bool) -> Dataset:
        if self.packing:
            packed = PackedDataset(data, self.max_length, cache=self.cache)
            self.stats[split_name].update(rows=len(packed), packing_efficiency=round(packed.efficiency, 4))
            _info(
                "%s: packed %d examples into %d rows of up to %d tokens; %.1f%% of the row tokens are real",
                split_name,
                len(data),
                len(packed),
                self.max_length,
                100 * packed.efficiency,
            )
            return packed
        # Validation order is fixed, longest first: less padding, and memory problems show at once.
        order = None if shuffle else np.argsort(-data.lengths, kind="stable")
        return ExampleDataset(data, order)

    def _report(self, split_name: str, data: TokenizedData, path: str) -> dict[str, Any]:
        stats = data.stats()
        if not stats["examples"]:
            raise DataError(
                f"{path}: none of the {stats['examples_read']} {split_name} examples has a supervised token left "
                f"(max_length={self.max_length}); raise data.max_length or check the data's answers."
            )
        _info(
            "%s: %d examples from %s (format %s%s), %d tokens, %d supervised",
            split_name,
            stats["examples"],
            path,
            data.format,
            ", tokenized by an earlier run" if data.from_cache else "",
            stats["tokens"],
            stats["supervised_tokens"],
        )
        if stats["truncated"]:
            _warn(
                "%d of %d %s examples were truncated to max_length=%d",
                stats["truncated"],
                stats["examples_read"],
                split_name,
                self.max_length,
            )
        if stats["dropped"]:
            _warn(
                "%d of %d %s examples were dropped: no supervised token left (after truncation to max_length=%d)",
                stats["dropped"],
                stats["examples_read"],
                split_name,
                self.max_length,
            )
        return stats

    def _report_prompts(self, prompts: TokenizedPrompts, path: str) -> dict[str, Any]:
        stats = prompts.stats()
        if self.format == "auto":
            _info("Detected the data format %r in %s", prompts.format, path)
        _info("predict: %d prompts from %s (format %s), %d tokens", len(prompts), path, prompts.format, stats["tokens"])
        if stats["truncated"]:
            _warn(
                "%d of %d prompts were longer than max_length=%d and keep only their last %d tokens",
                stats["truncated"],
                len(prompts),
                self.max_length,
                self.max_length,
            )
        return stats

    def _require_tokenizer(self) -> Any:
        tokenizer = self.tokenizer
        if tokenizer is None and self.trainer is not None:
            # Python users may hand the tokenizer to the model only; take it from there rather than fail.
            candidate = getattr(self.trainer.lightning_module, "tokenizer", None)
            if candidate is not None and not isinstance(candidate, str):
                self._tokenizer = tokenizer = candidate
        if tokenizer is None:
            raise ConfigError(
                "`tokenizer`=None: the data module needs a tokenizer; set data.tokenizer to the model's name or "
                "path, or pass a tokenizer object (SFTDataModule(..., tokenizer=tok) or set_tokenizer(tok))."
            )
        if self.chat_template is not None and self._templated is not tokenizer:
            # Idempotent: a tokenizer that already has the template and its tokens (the model's) stays as it is.
            apply_chat_template(tokenizer, self.chat_template)
            self._templated = tokenizer
        return tokenizer

    def _require_setup(self, dataset: Dataset | None) -> Dataset:
        if dataset is None:
            raise RuntimeError("SFTDataModule.setup() must run before its dataloaders are asked for.")
        return dataset


def split_train_val(data: TokenizedData, fraction: float, seed: int, path: str) -> tuple[TokenizedData, TokenizedData]:
    """A seeded split of one file's records into (train, val), with ceil(fraction * records) for validation.

    Raises:
        DataError: either side would hold no example.
    """
    n = data.n_records
    n_val = int(np.ceil(fraction * n))
    records = np.random.default_rng(seed).permutation(n)
    train, val = data.select_records(records[n_val:]), data.select_records(records[:n_val])
    if not len(train) or not len(val):
        side = "training" if not len(train) else "validation"
        raise DataError(
            f"`val_fraction`={fraction} of the {n} records in {path} leaves no {side} example; "
            "use more data, another val_fraction, or a separate val_file."
        )
    return train, val


def _str_or_none(value: Source | os.PathLike | None) -> Source | None:
    return value if value is None or isinstance(value, dict) else str(value)


def _info(message: str, *args: Any) -> None:
    # Every DDP rank runs setup(); only rank zero speaks.
    if getattr(rank_zero_only, "rank", 0) == 0:
        log.info(message, *args)


def _warn(message: str, *args: Any) -> None:
    if getattr(rank_zero_only, "rank", 0) == 0:
        log.warning(message, *args)
