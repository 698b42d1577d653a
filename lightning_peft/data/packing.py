"""Map-style datasets over tokenized examples: one example per item, several packed into one row, or prompts.

A packed row concatenates whole examples (none is split) chosen by first-fit-decreasing bin packing, which is
deterministic and fills rows to about 95 % or more on typical length mixes. Each item carries `position_ids` that
restart at 0 for each example: from them (with no attention mask and no KV cache) transformers builds a
block-diagonal causal mask, so the examples in a row do not see each other.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset

from lightning_peft.data import cache as data_cache
from lightning_peft.data.tokenization import TokenizedPrompts
from lightning_peft.data.tokenized import TokenizedData
from lightning_peft.labels import IGNORE_INDEX


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins of total length at most `capacity`, longest items first, each into the
    leftmost bin it fits in. Items longer than `capacity` raise ValueError.

    A max segment tree over the bins' free space finds that bin in O(log n), so a million examples pack in
    seconds rather than the hours a linear scan of the bins would take.
    """
    n = len(lengths)
    if n and max(lengths) > capacity:
        raise ValueError(f"an item of length {max(lengths)} does not fit in bins of {capacity}")
    size = 1
    while size < max(n, 1):
        size *= 2
    free = [0] * size + [capacity] * n + [0] * (size - n)  # leaves: every bin starts empty
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    bins: list[list[int]] = [[] for _ in range(n)]
    for item in sorted(range(n), key=lambda i: (-lengths[i], i)):
        node = 1
        while node < size:  # descend to the leftmost leaf with enough free space
            node = 2 * node if free[2 * node] >= lengths[item] else 2 * node + 1
        bins[node - size].append(item)
        free[node] -= lengths[item]
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return [b for b in bins if b]


class ExampleDataset(Dataset):
    """One tokenized example per item: {"input_ids", "labels"} as int32 arrays.

    Args:
        data: the tokenized examples.
        order: which examples, in which order (default: all, in file order).
    """

    def __init__(self, data: TokenizedData, order: Sequence[int] | None = None):
        self.data = data
        self.order = np.arange(len(data)) if order is None else np.asarray(order, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        input_ids, labels = self.data.example(int(self.order[i]))
        return {"input_ids": input_ids, "labels": labels}

    @property
    def lengths(self) -> np.ndarray:
        return self.data.lengths[self.order]


# Bump when `first_fit_decreasing` would group the same lengths differently, so old plans are no longer found.
PLAN_VERSION = 1


def packing_plan(lengths: np.ndarray, capacity: int, cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The rows `first_fit_decreasing` makes of examples of these `lengths`, as two flat arrays: row r holds the
    examples `items[offsets[r]:offsets[r + 1]]`.

    A million examples take seconds to plan, at every start; the plan depends on the lengths and the capacity
    only, so with `cache` it is kept in the data cache under their digest and a warm start reads it back.
    """
    lengths = np.asarray(lengths, dtype=np.int64)

    def plan() -> dict[str, np.ndarray]:
        rows = first_fit_decreasing(lengths.tolist(), capacity)
        items = np.fromiter((j for row in rows for j in row), dtype=np.int64, count=len(lengths))
        offsets = np.concatenate([[0], np.cumsum([len(row) for row in rows], dtype=np.int64)]).astype(np.int64)
        return {"items": items, "offsets": offsets}

    if not cache:
        arrays = plan()
    else:
        digest = hashlib.sha256(f"packing plan v{PLAN_VERSION}, capacity {capacity}\0".encode())
        digest.update(lengths.astype("<i8").tobytes())
        arrays = data_cache.cached_arrays(
            f"packing/{digest.hexdigest()}.safetensors", plan, check=lambda a: _check_plan(a, lengths, capacity)
        )
    return arrays["items"], arrays["offsets"]


def _check_plan(arrays: dict[str, np.ndarray], lengths: np.ndarray, capacity: int) -> None:
    """Raise ValueError unless `arrays` place every example exactly once in rows of at most `capacity` tokens."""
    items, offsets = arrays.get("items"), arrays.get("offsets")
    if items is None or offsets is None or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(items):
        raise ValueError("the plan's offsets do not cover its items")
    if len(items) != len(lengths) or not np.array_equal(np.sort(items), np.arange(len(lengths))):
        raise ValueError("the plan does not hold every example once")
    if np.any(np.diff(offsets) <= 0) or (len(items) and _row_sums(lengths, items, offsets).max() > capacity):
        raise ValueError("the plan has an empty or overfull row")


def _row_sums(lengths: np.ndarray, items: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    if len(offsets) < 2:
        return np.zeros(0, dtype=np.int64)
    return np.add.reduceat(np.asarray(lengths, dtype=np.int64)[items], offsets[:-1])


class PackedDataset(Dataset):
    """Whole examples packed into rows of at most `capacity` tokens: {"input_ids", "labels", "position_ids"}.

    Args:
        data: the tokenized examples, each at most `capacity` tokens long.
        capacity: the longest row (the data module's max_length).
        cache: keep the packing plan in the data cache (see `packing_plan`).
    """

    def __init__(self, data: TokenizedData, capacity: int, cache: bool = False):
        self.data = data
        self.capacity = capacity
        self.items, self.offsets = packing_plan(data.lengths, capacity, cache=cache)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        parts = [self.data.example(int(j)) for j in self.items[self.offsets[i] : self.offsets[i + 1]]]
        labels = np.concatenate([y for _, y in parts])
        starts = np.cumsum([0] + [len(x) for x, _ in parts[:-1]])
        # Nothing before an example's first token belongs to it: never learn that token from the previous example.
        labels[starts] = IGNORE_INDEX
        return {
            "input_ids": np.concatenate([x for x, _ in parts]),
            "labels": labels,
            "position_ids": np.concatenate([np.arange(len(x), dtype=np.int32) for x, _ in parts]),
        }

    @property
    def rows(self) -> list[list[int]]:
        """The examples of each row, in order."""
        return [self.items[a:b].tolist() for a, b in itertools.pairwise(self.offsets)]

    @property
    def lengths(self) -> np.ndarray:
        return _row_sums(self.data.lengths, self.items, self.offsets)

    @property
    def efficiency(self) -> float:
        """Real tokens over the rows' capacity (1.0 = no padding at all)."""
        return float(self.lengths.sum()) / max(1, len(self) * self.capacity)


class PromptDataset(Dataset):
    """One prompt per item: {"input_ids" (int32 array), "index" (the row in the file), "reference" (str or None)}.

    Args:
        data: the tokenized prompts.
        order: which prompts, in which order (default: all, in file order).
    """

    def __init__(self, data: TokenizedPrompts, order: Sequence[int] | None = None):
        self.data = data
        self.order = np.arange(len(data)) if order is None else np.asarray(order, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        index = int(self.order[i])
        return {"input_ids": self.data.input_ids[index], "index": index, "reference": self.data.references[index]}

    @property
    def lengths(self) -> np.ndarray:
        return self.data.lengths[self.order]
