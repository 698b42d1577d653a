"""One data source at scale: its rows in chunks, rendered and tokenized by worker processes, back in file order.

A JSON Lines file is cut into byte ranges of `chunk_rows` rows that each worker reads for itself, so no process
ever holds the whole file; other sources (CSV, Parquet, JSON, `datasets` folders, Hub data sets) are read whole
and handed out in slices. Each chunk goes through the very functions a single pass over the whole file uses
(`render_records`, `tokenize_rendered`), and only its row numbers are shifted to the file's: the result is the same
for any number of processes and any chunk size. At most two chunks per worker are in flight, so memory stays
bounded; the results come back in order, to be written to the cache one after the other.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from lightning_peft.data import cache as data_cache
from lightning_peft.data.formats import render_records, training_format
from lightning_peft.data.readers import (
    JSONL_SUFFIXES,
    Records,
    RowChunk,
    jsonl_chunks,
    read_records,
    records_chunks,
    require_exists,
    require_rows,
)
from lightning_peft.data.tokenization import tokenize_rendered
from lightning_peft.data.tokenized import TokenizedData

log = logging.getLogger(__name__)

CHUNK_ROWS = 2000  # rows per task: large enough to amortize the hand-over, small enough to keep memory flat


def prepare_file(
    path: str,
    *,
    fmt: str,
    columns: Mapping[str, str],
    max_length: int,
    truncation: bool,
    train_on_prompt: bool,
    tokenizer: Any,
    cache: bool = True,
    read: Callable[[], Records] | None = None,
    digest: str | None = None,
    roles: Mapping[str, str] | None = None,
    num_proc: int | None = None,
    progress: bool = True,
    chunk_rows: int = CHUNK_ROWS,
) -> TokenizedData:
    """Read, render and tokenize one data file, or load the result of an earlier run from the cache.

    Data that is not a local file (a Hub data set) comes with its own `read` (the records) and `digest` (its cache
    identity, see `hub_datasets.HubData`); `path` then only names it. `num_proc` worker processes (default: the
    cores available) tokenize chunks of `chunk_rows` rows; neither changes the result.

    Raises:
        DataError: the file is missing or malformed, or an example is too long with truncation off.
    """
    settings = dict(
        format=fmt,
        columns=dict(sorted(columns.items())),
        max_length=max_length,
        truncation=truncation,
        train_on_prompt=train_on_prompt,
        # Only when given: the cache entries of data without a role mapping keep their keys.
        **({"roles": dict(sorted(roles.items()))} if roles else {}),
    )

    def build() -> Iterator[TokenizedData]:
        chunks = row_chunks(path, read, chunk_rows)
        used = training_format(chunks[0].read(), fmt, columns)
        job = TokenizeJob(used, columns, roles, tokenizer, max_length, truncation, train_on_prompt)
        workers = num_proc or default_num_proc()
        return tokenize_chunks(job, chunks, workers, progress, Path(path).name)

    if not cache:
        return concatenate(list(build()))
    return data_cache.cached(path, settings, tokenizer, build, digest)


@dataclass(frozen=True)
class TokenizeJob:
    """Everything a worker needs to turn a chunk of rows into tokens (the format already resolved)."""

    fmt: str
    columns: Mapping[str, str]
    roles: Mapping[str, str] | None
    tokenizer: Any
    max_length: int
    truncation: bool
    train_on_prompt: bool

    def __call__(self, chunk: RowChunk) -> TokenizedData:
        records = chunk.read()
        used, rendered = render_records(
            records, self.fmt, self.columns, self.tokenizer, self.train_on_prompt, self.roles
        )
        data = tokenize_rendered(rendered, self.tokenizer, self.max_length, self.truncation, used, records.where)
        data.record_index += chunk.first_row
        data.dropped += chunk.first_row
        return data


def row_chunks(path: str, read: Callable[[], Records] | None, rows: int = CHUNK_ROWS) -> list[RowChunk]:
    """The chunks of a source: byte ranges of a local JSON Lines file, else slices of the rows `read` returns.

    Raises:
        DataError: the file is missing, malformed (for non-JSONL files) or holds no row.
    """
    if read is None and Path(path).suffix.lower() in JSONL_SUFFIXES:
        chunks = jsonl_chunks(require_exists(path), rows)
        require_rows(path, sum(chunk.n_rows for chunk in chunks))
        return chunks
    return records_chunks(read() if read is not None else read_records(path), rows)


def default_num_proc() -> int:
    """The CPU cores this process may use (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def tokenize_chunks(
    job: TokenizeJob, chunks: Sequence[RowChunk], num_proc: int, progress: bool = True, name: str = "data"
) -> Iterator[TokenizedData]:
    """Each chunk tokenized, in order; by `num_proc` worker processes when there is more than one chunk.

    A progress bar (rows/s, ETA) shows on a terminal when `progress` is on; logs get a line before and after.
    """
    from tqdm.auto import tqdm

    total = sum(chunk.n_rows for chunk in chunks)
    workers = max(1, min(num_proc, len(chunks)))
    log.info("Tokenizing the %d rows of %s with %d process%s", total, name, workers, "es" if workers > 1 else "")
    began, tokens = time.perf_counter(), 0
    # disable=None: only on a terminal, so logs and CI output stay free of carriage-return noise.
    with tqdm(total=total, unit=" rows", desc=f"Tokenizing {name}", disable=None if progress else True) as bar:
        for chunk, data in zip(chunks, _run_ordered(job, chunks, workers), strict=True):
            bar.update(chunk.n_rows)
            tokens += len(data.input_ids)
            yield data
    seconds = time.perf_counter() - began
    log.info("Tokenized %s: %d tokens in %.1f s (%.0f tokens/s)", name, tokens, seconds, tokens / max(seconds, 1e-9))


def _run_ordered(job: TokenizeJob, chunks: Sequence[RowChunk], workers: int) -> Iterator[TokenizedData]:
    if workers == 1:
        yield from map(job, chunks)
        return
    # fork where there is one: workers inherit the tokenizer instead of each loading torch and unpickling it.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_set_job, initargs=(job,))
    pending: deque[Future] = deque()
    queue = iter(chunks)
    try:
        # At most two chunks per worker in flight: one being tokenized, one waiting, and memory stays flat.
        for chunk in islice(queue, 2 * workers):
            pending.append(pool.submit(_run_job, chunk))
        while pending:
            result = pending.popleft().result()
            if (chunk := next(queue, None)) is not None:
                pending.append(pool.submit(_run_job, chunk))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_JOB: TokenizeJob | None = None


def _set_job(job: TokenizeJob) -> None:
    global _JOB
    _JOB = job


def _run_job(chunk: RowChunk) -> TokenizedData:
    assert _JOB is not None, "the worker initializer sets the job"
    return _JOB(chunk)


def concatenate(parts: Sequence[TokenizedData]) -> TokenizedData:
    """The parts as one (in memory), as a single pass over the whole source would have built it."""
    if len(parts) == 1:
        return parts[0]
    ids = np.concatenate([part.input_ids for part in parts])
    starts = np.cumsum([0] + [len(part.input_ids) for part in parts[:-1]])
    offsets = [parts[0].offsets[:1]] + [part.offsets[1:] + start for part, start in zip(parts, starts, strict=True)]
    return TokenizedData(
        input_ids=ids,
        loss_bits=np.packbits(np.concatenate([part.loss_mask() for part in parts])),
        offsets=np.concatenate(offsets).astype(np.int64),
        record_index=np.concatenate([part.record_index for part in parts]),
        truncated=np.concatenate([part.truncated for part in parts]),
        dropped=np.concatenate([part.dropped for part in parts]),
        n_records=sum(part.n_records for part in parts),
        format=parts[0].format,
    )
