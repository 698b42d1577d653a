"""Supervised fine-tuning data: files → records → text with loss spans → tokens and labels → batches.

Modules, in the order data flows through them: `readers` (files → records), `formats` (records → text and the
supervised character spans; `chat_templates` gives the tokenizer the template `chat_template` names), `tokenization` (→ input_ids and labels, truncation), `cache` (tokenized files kept
between runs), `packing` (datasets, with whole examples packed into rows), `collate` (padding and the
length-grouped sampler, left-padded prompt batches) and `datamodule` (the `SFTDataModule` that ties them together).
Prompts for `predict` take the same path without labels or cache: `formats.render_prompts` →
`tokenization.prepare_prompts` → `packing.PromptDataset` → `collate.PromptCollator`.
"""

from lightning_peft.data.collate import (
    LengthGroupedSampler,
    PromptCollator,
    ResumableDataLoader,
    SFTCollator,
    ShuffleSampler,
)
from lightning_peft.data.datamodule import SFTDataModule
from lightning_peft.data.formats import FORMATS
from lightning_peft.data.packing import ExampleDataset, PackedDataset, PromptDataset, first_fit_decreasing
from lightning_peft.data.tokenization import TokenizedPrompts
from lightning_peft.data.tokenized import TokenizedData
from lightning_peft.labels import IGNORE_INDEX

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "ExampleDataset",
    "LengthGroupedSampler",
    "PackedDataset",
    "PromptCollator",
    "PromptDataset",
    "ResumableDataLoader",
    "SFTCollator",
    "SFTDataModule",
    "ShuffleSampler",
    "TokenizedData",
    "TokenizedPrompts",
    "first_fit_decreasing",
]
