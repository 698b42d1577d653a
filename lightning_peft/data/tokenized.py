"""The examples of one data file as flat token arrays: what tokenizing produces and the cache stores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lightning_peft.labels import IGNORE_INDEX


@dataclass
class TokenizedData:
    """The examples of one data file as flat arrays (cheap to cache, to share with workers and to slice).

    Attributes:
        input_ids: all token ids, example after example (int32).
        labels: the matching labels (int32, -100 where unsupervised).
        offsets: example i is `input_ids[offsets[i]:offsets[i+1]]` (int64, one more than the examples).
        record_index: the record (row of the file) each kept example came from (int64).
        truncated: whether each kept example was cut to max_length (bool).
        dropped: the records that were dropped because no supervised token was left (int64).
        n_records: records read from the file, kept or not.
        format: the data format used (after auto-detection).
        from_cache: whether this came from the on-disk cache (not stored).
    """

    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    record_index: np.ndarray
    truncated: np.ndarray
    dropped: np.ndarray
    n_records: int
    format: str
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of example i."""
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[start:end], self.labels[start:end]

    def select_records(self, records: np.ndarray) -> TokenizedData:
        """The examples that came from the given records (for a train/validation split of one file)."""
        records = np.sort(np.asarray(records, dtype=np.int64))
        keep = np.flatnonzero(np.isin(self.record_index, records))
        ids = [self.example(i) for i in keep]
        lengths = np.array([len(x) for x, _ in ids], dtype=np.int64)
        return TokenizedData(
            input_ids=np.concatenate([x for x, _ in ids]) if ids else np.zeros(0, np.int32),
            labels=np.concatenate([y for _, y in ids]) if ids else np.zeros(0, np.int32),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            record_index=self.record_index[keep],
            truncated=self.truncated[keep],
            dropped=self.dropped[np.isin(self.dropped, records)],
            n_records=len(records),
            format=self.format,
            from_cache=self.from_cache,
        )

    def stats(self) -> dict[str, int]:
        """Counts for logs and `SFTDataModule.stats`."""
        return {
            "examples_read": int(self.n_records),
            "examples": len(self),
            "dropped": len(self.dropped),
            "truncated": int(self.truncated.sum()),
            "tokens": len(self.input_ids),
            "supervised_tokens": int((self.labels != IGNORE_INDEX).sum()),
        }
