"""Several tokenized data sets → one training mixture, reproducibly (the same seed gives the same examples).

Each source keeps its examples as they are (every source is rendered with its own format and columns before it gets
here) and contributes:
- all of them when it gives neither `weight` nor `count` (Axolotl's behaviour: the data sets are concatenated);
- `round(weight * len)` of them with `weight` (0.5 halves the source, 2.0 takes each example twice);
- exactly `count` of them with `count`.
Fewer than a source holds are a seeded sample without repeats; more repeat whole shuffled passes first, so no
example is seen a third time before every one was seen twice.

The mixture's records are the distinct (source, record) pairs taken, numbered densely: an example repeated by its
weight keeps one record number, so `val_fraction` puts all its copies on the same side of the split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lightning_peft.data.sources import DataSource
from lightning_peft.data.tokenized import TokenizedData
from lightning_peft.errors import DataError


def planned_count(source: DataSource, available: int) -> int:
    """How many examples `source` contributes when it holds `available` usable ones."""
    if source.count is not None:
        return source.count
    if source.weight is not None:
        return round(source.weight * available)
    return available


def pick(available: int, wanted: int, rng: np.random.Generator) -> np.ndarray:
    """`wanted` example indices out of `available`: whole shuffled passes, then a shuffled partial one."""
    passes = [rng.permutation(available) for _ in range(math.ceil(wanted / available))]
    return np.concatenate(passes)[:wanted] if passes else np.zeros(0, np.int64)


def mix(parts: Sequence[TokenizedData], sources: Sequence[DataSource], seed: int) -> TokenizedData:
    """One `TokenizedData` holding each part's share, parts in order (the training sampler shuffles them).

    Raises:
        DataError: a source's weight leaves it no example.
    """
    examples, records, truncated = [], [], []
    for i, (part, source) in enumerate(zip(parts, sources, strict=True)):
        wanted = planned_count(source, len(part))
        if wanted < 1:
            raise DataError(
                f"`{source.setting}`: weight {source.weight} of its {len(part)} examples leaves none; "
                "raise its weight or give a count."
            )
        # One generator per source, seeded by (seed, position): adding a source does not reshuffle the others.
        chosen = pick(len(part), wanted, np.random.default_rng([seed, i]))
        examples.extend(part.example(int(j)) for j in chosen)
        records.append(np.stack([np.full(len(chosen), i), part.record_index[chosen]], axis=1))
        truncated.append(part.truncated[chosen])
    pairs = np.concatenate(records)
    _, dense = np.unique(pairs, axis=0, return_inverse=True)
    formats = {part.format for part in parts}
    mixed = TokenizedData.from_examples(
        examples,
        dense.reshape(-1),
        np.concatenate(truncated),
        [],  # each part reports its own dropped examples before mixing
        n_records=int(dense.max()) + 1,
        format=formats.pop() if len(formats) == 1 else "mixed",
        dtype=np.result_type(*(part.input_ids.dtype for part in parts)),
    )
    mixed.from_cache = all(part.from_cache for part in parts)
    return mixed
