"""Supervised fine-tuning data: files → records → text with loss spans → tokens and labels → batches.

Modules, in the order data flows through them: `readers` (files → records), `formats` (records → text and the
supervised character spans), `tokenization` (→ input_ids and labels, truncation), `cache` (tokenized files kept
between runs), `packing` (datasets, with whole examples packed into rows), `collate` (padding and the
length-grouped sampler) and `datamodule` (the `SFTDataModule` that ties them together).
"""

from lightning_peft.data.collate import LengthGroupedSampler, SFTCollator
from lightning_peft.data.datamodule import SFTDataModule
from lightning_peft.data.formats import FORMATS
from lightning_peft.data.packing import ExampleDataset, PackedDataset, first_fit_decreasing
from lightning_peft.data.tokenization import IGNORE_INDEX, TokenizedData

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "ExampleDataset",
    "LengthGroupedSampler",
    "PackedDataset",
    "SFTCollator",
    "SFTDataModule",
    "TokenizedData",
    "first_fit_decreasing",
]
