"""The examples of one data file as flat token arrays: what tokenizing produces and the cache stores."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from lightning_peft.labels import IGNORE_INDEX


@dataclass
class TokenizedData:
    """The examples of one data file as flat arrays (cheap to cache, to memory-map, to share with workers).

    Labels are not stored: they are `input_ids` where the loss mask is set and -100 elsewhere, so the mask is kept
    as one bit per token, packed (`np.packbits`), beside token ids in the smallest integer type that holds the
    vocabulary. The arrays may be read-only memory maps of the cache file.

    Attributes:
        input_ids: all token ids, example after example (uint16 when the vocabulary fits, else int32).
        loss_bits: the loss mask, one bit per token of `input_ids` (uint8, `np.packbits` order).
        offsets: example i is `input_ids[offsets[i]:offsets[i+1]]` (int64, one more than the examples).
        record_index: the record (row of the file) each kept example came from (int64).
        truncated: whether each kept example was cut to max_length (bool).
        dropped: the records that were dropped because no supervised token was left (int64).
        n_records: records read from the file, kept or not.
        format: the data format used (after auto-detection).
        from_cache: whether this came from the on-disk cache (not stored).
    """

    input_ids: np.ndarray
    loss_bits: np.ndarray
    offsets: np.ndarray
    record_index: np.ndarray
    truncated: np.ndarray
    dropped: np.ndarray
    n_records: int
    format: str
    from_cache: bool = False

    @classmethod
    def from_examples(
        cls,
        examples: Iterable[tuple[np.ndarray, np.ndarray]],
        record_index: Iterable[int],
        truncated: Iterable[bool],
        dropped: Iterable[int],
        n_records: int,
        format: str,
        dtype: np.dtype | type = np.int32,
    ) -> TokenizedData:
        """From (input_ids, labels) pairs, one per kept example (labels -100 where no loss is taken)."""
        pairs = list(examples)
        lengths = np.array([len(ids) for ids, _ in pairs], dtype=np.int64)
        ids = np.concatenate([x for x, _ in pairs]) if pairs else np.zeros(0, np.int32)
        labels = np.concatenate([y for _, y in pairs]) if pairs else np.zeros(0, np.int32)
        return cls(
            input_ids=ids.astype(dtype),
            loss_bits=np.packbits(labels != IGNORE_INDEX),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            record_index=np.asarray(list(record_index), dtype=np.int64),
            truncated=np.asarray(list(truncated), dtype=bool),
            dropped=np.asarray(list(dropped), dtype=np.int64),
            n_records=n_records,
            format=format,
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def loss_mask(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """The loss mask of tokens [start, end) as bools (unpacks only the bytes that hold them)."""
        end = len(self.input_ids) if end is None else end
        first = start // 8
        bits = np.unpackbits(self.loss_bits[first : (end + 7) // 8])
        return bits[start - 8 * first : end - 8 * first].astype(bool)

    def labels_of(self, start: int, end: int) -> np.ndarray:
        """The labels of tokens [start, end): the token id where the loss is taken, -100 elsewhere (int32)."""
        ids = self.input_ids[start:end].astype(np.int32)  # before np.where: -100 does not fit a uint16
        return np.where(self.loss_mask(start, end), ids, np.int32(IGNORE_INDEX))

    @property
    def labels(self) -> np.ndarray:
        """Every label (int32, a new array as long as `input_ids`: meant for small data and tests)."""
        return self.labels_of(0, len(self.input_ids))

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of example i, both int32 arrays of their own."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[start:end].astype(np.int32), self.labels_of(start, end)

    def supervised_tokens(self) -> int:
        """How many tokens carry the loss (the set bits; padding bits of the last byte are never set)."""
        return int(np.bitwise_count(np.asarray(self.loss_bits)).sum(dtype=np.int64))

    def select_records(self, records: np.ndarray) -> TokenizedData:
        """The examples that came from the given records (for a train/validation split of one file)."""
        records = np.sort(np.asarray(records, dtype=np.int64))
        keep = np.flatnonzero(np.isin(self.record_index, records))
        selected = TokenizedData.from_examples(
            (self.example(i) for i in keep),
            self.record_index[keep],
            self.truncated[keep],
            self.dropped[np.isin(self.dropped, records)],
            n_records=len(records),
            format=self.format,
            dtype=self.input_ids.dtype,
        )
        selected.from_cache = self.from_cache
        return selected

    def stats(self) -> dict[str, int]:
        """Counts for logs and `SFTDataModule.stats`."""
        return {
            "examples_read": int(self.n_records),
            "examples": len(self),
            "dropped": len(self.dropped),
            "truncated": int(self.truncated.sum()),
            "tokens": len(self.input_ids),
            "supervised_tokens": self.supervised_tokens(),
        }


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest integer type that holds every token id: uint16 up to 65,536 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)
