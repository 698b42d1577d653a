"""Batches: dynamic padding (each batch to its own longest row), the training samplers and a resumable loader.

The batch contract with the LightningModule: `input_ids` and `labels` (B, T) int64, labels -100 where no loss is
taken and not shifted; then either `attention_mask` (padded examples) or `position_ids` (packed rows, no mask).
Prediction batches (`PromptCollator`) are left-padded prompts for `generate`: `input_ids`, `attention_mask`,
`index` and `reference`, no labels.

Training order is a pure function of (seed, epoch) in both samplers, and `ResumableDataLoader` remembers how many
batches of the epoch it handed out: together they let a resumed run continue mid-epoch with exactly the batches
an uninterrupted run would have seen.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from lightning_peft.labels import IGNORE_INDEX


@dataclass
class SFTCollator:
    """Pads a list of dataset items into one batch of tensors.

    Items with `position_ids` (packed rows) give `position_ids` and no `attention_mask`: the padding is one more
    "example" whose positions start at 0, and as it comes after the real tokens, causal attention keeps it out of
    them. Other items give an `attention_mask` with 0 on the padding.

    Args:
        pad_token_id: the id written into padding (its labels are -100 whatever it is).
    """

    pad_token_id: int

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(item["input_ids"]) for item in items]
        shape = (len(items), max(lengths))
        input_ids = np.full(shape, self.pad_token_id, dtype=np.int64)
        labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
        packed = "position_ids" in items[0]
        extra = np.zeros(shape, dtype=np.int64)  # position_ids when packed, attention_mask otherwise
        for row, (item, n) in enumerate(zip(items, lengths, strict=True)):
            input_ids[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
            if packed:
                extra[row, :n] = item["position_ids"]
                extra[row, n:] = np.arange(shape[1] - n)
            else:
                extra[row, :n] = 1
        batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
        batch["position_ids" if packed else "attention_mask"] = torch.from_numpy(extra)
        return batch


@dataclass
class PromptCollator:
    """Left-pads prompts into one generation batch, so every row's next token comes right after its prompt.

    Batch: `input_ids` and `attention_mask` (B, T) int64 with the padding (mask 0) on the left, `index` (B,) int64
    (each prompt's row in the file, to put the generations back in file order), and `reference` (a list of B
    strings or None: each row's answer when the file holds one).

    Args:
        pad_token_id: the id written into padding.
    """

    pad_token_id: int

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(item["input_ids"]) for item in items)
        input_ids = np.full((len(items), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(items), width), dtype=np.int64)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, width - n :] = item["input_ids"]
            attention_mask[row, width - n :] = 1
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "index": torch.tensor([item["index"] for item in items], dtype=torch.int64),
            "reference": [item.get("reference") for item in items],
        }


class LengthGroupedSampler(Sampler[int]):
    """Shuffled indices in which neighbours have similar lengths, so batches carry little padding.

    Like Hugging Face's `LengthGroupedSampler`: a seeded permutation is cut into mega-chunks of
    `batch_size * mega_batch_mult` indices, each sorted longest first, and the longest index overall is moved to
    the very front so that an out-of-memory error shows on the first step rather than hours in. It yields plain
    indices, so Lightning can wrap it in its `DistributedSamplerWrapper` under DDP (every rank computes the same
    order from the seed and epoch, then takes its share), and that wrapper forwards `set_epoch`.

    Args:
        lengths: the length of each dataset item.
        batch_size: the batch size the indices will be grouped into.
        seed: the seed of the shuffle; the epoch is mixed in.
        mega_batch_mult: mega-chunk size in batches; larger groups lengths better but shuffles less.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega_batch_mult: int = 50):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of `epoch` (Lightning calls this before each training epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        if not len(self.lengths):
            return iter([])
        permutation = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.lengths))
        size = self.batch_size * self.mega_batch_mult
        chunks = [permutation[i : i + size] for i in range(0, len(permutation), size)]
        # A stable sort keeps the shuffled order among equal lengths.
        chunks = [chunk[np.argsort(-self.lengths[chunk], kind="stable")] for chunk in chunks]
        longest = int(np.argmax([self.lengths[chunk[0]] for chunk in chunks]))
        chunks[0][0], chunks[longest][0] = chunks[longest][0], chunks[0][0]
        return iter(np.concatenate(chunks).tolist())


class ShuffleSampler(Sampler[int]):
    """A seeded permutation of `range(num_items)`, new each epoch and the same for the same (seed, epoch).

    Unlike a `RandomSampler` with a generator, whose order depends on how often the generator was used, the order
    here follows from the epoch alone, so a resumed run sees the epoch it left. Lightning wraps it in its
    `DistributedSamplerWrapper` under DDP (and forwards `set_epoch`), as it does the length-grouped sampler.

    Args:
        num_items: the dataset's length.
        seed: the seed of the shuffle; the epoch is mixed in.
    """

    def __init__(self, num_items: int, seed: int = 0):
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of `epoch` (Lightning calls this before each training epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items).tolist())


class ResumableDataLoader(DataLoader):
    """A `DataLoader` that continues mid-epoch after a resume, through Lightning's stateful-loader protocol.

    It counts the batches it has handed out in the current epoch. Lightning's fit loop stores `state_dict()` (the
    sampler's epoch and that count) in every checkpoint and gives it back through `load_state_dict()` on resume;
    the first iteration of that same epoch then skips those batches at the index level (nothing is loaded or
    collated for them). A resume that lands in a later epoch (the checkpoint closed its epoch) skips nothing.

    The skip is exact when the sampler's order depends only on its epoch (`LengthGroupedSampler`,
    `ShuffleSampler`, and Lightning's distributed wrappers of them); under DDP each rank skips its own batches.
    The underlying iterator is created on the first `next()`, after Lightning's `set_epoch`, so worker processes
    never prefetch the order of the wrong epoch.
    """

    # Class attributes, not __init__ arguments: Lightning re-creates loaders from their saved init arguments (DDP).
    _delivered = 0
    _skip = 0
    _resume_at: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        """The position in the data: the sampler's epoch and the batches of it handed out so far."""
        return {"epoch": self._epoch(), "batches": self._delivered}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue after `state_dict["batches"]` batches when epoch `state_dict["epoch"]` is iterated next."""
        self._resume_at = (int(state_dict["epoch"]), int(state_dict["batches"]))

    def __iter__(self) -> Iterator[Any]:
        return _CountingIterator(self)

    @property
    def _index_sampler(self) -> Any:
        # torch's iterators take their batches of indices from here (also on every epoch of persistent workers).
        return _SkipFirst(super()._index_sampler, self)

    def _epoch(self) -> int:
        for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if hasattr(sampler, "epoch"):
                return int(sampler.epoch)
        return 0

    def _start_epoch(self) -> None:
        resume, self._resume_at = self._resume_at, None
        skip = resume[1] if resume is not None and resume[0] == self._epoch() else 0
        self._skip = self._delivered = min(skip, len(self))

    def _new_iterator(self) -> Iterator[Any]:
        return super().__iter__()


class _CountingIterator:
    def __init__(self, loader: ResumableDataLoader):
        self.loader = loader
        self.iterator: Iterator[Any] | None = None

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        if self.iterator is None:
            self.loader._start_epoch()
            self.iterator = self.loader._new_iterator()
        batch = next(self.iterator)
        self.loader._delivered += 1
        return batch


class _SkipFirst:
    """A batch sampler that leaves out the loader's pending skip (read when an epoch's iteration starts)."""

    def __init__(self, batches: Any, loader: ResumableDataLoader):
        self.batches = batches
        self.loader = loader

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.batches), self.loader._skip, None)
