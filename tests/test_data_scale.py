"""Preparing large data: chunked and parallel tokenization equals one pass, the memory-mapped cache file, its size,
progress output, and rebuilding damaged entries. The figures at scale come from benchmarks/data_scale.py."""

from __future__ import annotations

import csv
import itertools
import json
import logging

import numpy as np
import pytest

from lightning_peft.data import SFTDataModule, token_file
from lightning_peft.data import cache as data_cache
from lightning_peft.data.formats import render_records
from lightning_peft.data.preparation import prepare_file
from lightning_peft.data.readers import read_records
from lightning_peft.data.tokenization import tokenize_rendered
from lightning_peft.errors import ConfigError, DataError

MAX_LENGTH = 48
ARRAYS = ("input_ids", "loss_bits", "offsets", "record_index", "truncated", "dropped")


def rows(n: int = 23) -> list[dict]:
    """Chats of many lengths: some truncated to MAX_LENGTH, some dropped (the prompt alone fills MAX_LENGTH), a
    system turn in some, multi-turn in others."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        user = "q" * (80 if i % 7 == 3 else int(rng.integers(1, 12)))  # every 7th row: no answer token fits
        messages = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        messages += [
            {"role": "user", "content": user},
            {"role": "assistant", "content": "a" * int(rng.integers(1, 40))},
        ]
        if i % 4 == 1:
            messages += [{"role": "user", "content": "more"}, {"role": "assistant", "content": f"answer {i}"}]
        out.append({"messages": messages})
    return out


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """A cache folder per test: the tests below look at the one entry their data makes."""
    monkeypatch.setenv("LPEFT_DATA_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    # A blank line and a byte-order mark: line numbers and the first row must survive the byte-range chunks.
    lines = [json.dumps(row) for row in rows()]
    path.write_text("\ufeff" + "\n".join([*lines[:5], "", *lines[5:]]) + "\n", encoding="utf-8")
    return path


def prepare(path, tokenizer, **kwargs):
    settings = dict(fmt="auto", columns={}, max_length=MAX_LENGTH, truncation=True, train_on_prompt=False)
    return prepare_file(str(path), tokenizer=tokenizer, **{**settings, **kwargs})


def one_pass(path, tokenizer):
    """What the data module built before the chunked pipeline: the whole file read, rendered, tokenized at once."""
    records = read_records(path)
    used, rendered = render_records(records, "auto", {}, tokenizer)
    return tokenize_rendered(rendered, tokenizer, MAX_LENGTH, True, used, records.where)


def assert_same(data, reference):
    for name in ARRAYS:
        assert np.array_equal(np.asarray(getattr(data, name)), np.asarray(getattr(reference, name))), name
    assert (data.n_records, data.format, str(data.input_ids.dtype)) == (
        reference.n_records,
        reference.format,
        str(reference.input_ids.dtype),
    )
    assert [data.example(i)[1].tolist() for i in range(len(data))] == [
        reference.example(i)[1].tolist() for i in range(len(reference))
    ]


def test_parallel_chunks_equal_one_pass(jsonl, tiny_tokenizer):
    reference = one_pass(jsonl, tiny_tokenizer)
    stats = reference.stats()
    assert stats["truncated"] and stats["dropped"] and stats["examples"] > 10, "the data must exercise every path"
    serial = prepare(jsonl, tiny_tokenizer, cache=False, num_proc=1)
    parallel = prepare(jsonl, tiny_tokenizer, cache=False, num_proc=2, chunk_rows=4)
    cached = prepare(jsonl, tiny_tokenizer, cache=True, num_proc=2, chunk_rows=3)
    for data in (serial, parallel, cached):
        assert_same(data, reference)


def test_chunks_of_rows_read_whole_equal_one_pass(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["prompt", "completion"])
        writer.writeheader()
        writer.writerows({"prompt": f"p{i} " * (i % 9), "completion": f"c{i} " * (i % 5 + 1)} for i in range(17))
    reference = one_pass(path, tiny_tokenizer)
    assert_same(prepare(path, tiny_tokenizer, cache=False, num_proc=2, chunk_rows=5), reference)


def test_error_in_a_later_chunk_names_its_line(jsonl, tiny_tokenizer):
    lines = jsonl.read_text(encoding="utf-8").split("\n")
    lines[15] = '{"messages": [}'
    jsonl.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.jsonl line 16: malformed JSON"):
        prepare(jsonl, tiny_tokenizer, cache=False, num_proc=2, chunk_rows=3)


def test_cache_is_memory_mapped_and_a_plain_safetensors_file(jsonl, tiny_tokenizer):
    from safetensors.numpy import load_file

    data = prepare(jsonl, tiny_tokenizer, num_proc=1)
    assert isinstance(data.input_ids, np.memmap) and isinstance(data.loss_bits, np.memmap)
    assert data.input_ids.dtype == np.uint16 and not data.input_ids.flags.writeable
    (entry,) = data_cache.cache_dir().glob("*.safetensors")
    arrays = load_file(str(entry))
    for name in ARRAYS:
        assert np.array_equal(arrays[name], np.asarray(getattr(data, name))), name


def test_cache_size_is_the_tokens_plus_a_bit_each_plus_the_index(jsonl, tiny_tokenizer):
    data = prepare(jsonl, tiny_tokenizer, num_proc=1)
    (entry,) = data_cache.cache_dir().glob("*.safetensors")
    tokens, examples, dropped = len(data.input_ids), len(data), len(data.dropped)
    # uint16 ids, one mask bit per token, offsets + record index (int64) and a truncated flag per example.
    index = 8 * (examples + 1) + 8 * examples + examples + 8 * dropped
    assert entry.stat().st_size == token_file._DATA_START + 2 * tokens + (tokens + 7) // 8 + index


def test_progress_and_logs_without_a_terminal(jsonl, tiny_tokenizer, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="lightning_peft.data"):
        prepare(jsonl, tiny_tokenizer, cache=False, num_proc=2, chunk_rows=4, progress=True)
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "Tokenizing" not in captured.err  # no bar when stderr is not a terminal
    assert "Tokenizing the 23 rows of train.jsonl with 2 processes" in caplog.text
    assert "Tokenized train.jsonl:" in caplog.text


@pytest.mark.parametrize("damage", ["truncate", "header", "version"])
def test_damaged_cache_entry_is_rebuilt(jsonl, tiny_tokenizer, damage, caplog):
    first = prepare(jsonl, tiny_tokenizer, num_proc=1)
    reference = {name: np.array(getattr(first, name)) for name in ARRAYS}
    del first  # let go of the memory map before the file is damaged
    (entry,) = data_cache.cache_dir().glob("*.safetensors")
    raw = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(raw[: len(raw) - 5])
    elif damage == "header":
        entry.write_bytes(raw[:8] + b"{not json" + raw[17:])
    else:
        entry.write_bytes(raw.replace(b'"version": "2"', b'"version": "9"'))
    with caplog.at_level(logging.WARNING, logger="lightning_peft.data"):
        again = prepare(jsonl, tiny_tokenizer, num_proc=1)
    assert "Ignoring the unreadable data cache entry" in caplog.text
    assert not again.from_cache
    for name in ARRAYS:
        assert np.array_equal(np.asarray(getattr(again, name)), reference[name]), name
    assert prepare(jsonl, tiny_tokenizer, num_proc=1).from_cache


def test_num_proc_is_checked():
    with pytest.raises(ConfigError, match=r"`num_proc`=0 must be an integer of at least 1"):
        SFTDataModule("train.jsonl", num_proc=0)


# ---- what a warm start skips: hashing an unchanged file, planning the same packing again ----------------------


def _must_not_run(*args, **kwargs):
    raise AssertionError("computed again instead of read from the cache")


def test_source_digest_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(data_cache, "_RACY_SECONDS", 0.0)
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "one"}\n')
    first = data_cache.source_digest(data)
    with monkeypatch.context() as patched:
        patched.setattr(data_cache, "_sha256_of_files", _must_not_run)
        assert data_cache.source_digest(data) == first  # the stat is unchanged: the remembered digest
    # Same size, modification time put back (as `cp -p` or `rsync -t` would): the change time still moved.
    stat = data.stat()
    data.write_text('{"text": "two"}\n')
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = data_cache.source_digest(data)
    assert second != first
    assert second == data_cache._sha256_of_files(data, [data])


def test_recently_changed_files_are_hashed_every_time(tmp_path, monkeypatch):
    monkeypatch.setattr(data_cache, "_RACY_SECONDS", 3600.0)  # every file counts as just written
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "one"}\n')
    data_cache.source_digest(data)
    assert not list(data_cache.cache_dir().glob("digests/*.json"))


def test_dataset_folder_digest_notices_a_changed_file(tmp_path, monkeypatch):
    monkeypatch.setattr(data_cache, "_RACY_SECONDS", 0.0)
    folder = tmp_path / "saved"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "a.arrow").write_bytes(b"first")
    before = data_cache.source_digest(folder)
    (folder / "train" / "b.arrow").write_bytes(b"second")
    assert data_cache.source_digest(folder) != before


def test_packing_plan_is_kept_in_the_cache_and_checked(monkeypatch, caplog):
    from lightning_peft.data import packing

    lengths = np.random.default_rng(1).integers(1, 40, 300)
    items, offsets = packing.packing_plan(lengths, 64)
    rows = [items[a:b].tolist() for a, b in itertools.pairwise(offsets)]
    assert rows == packing.first_fit_decreasing(lengths.tolist(), 64)
    (entry,) = (data_cache.cache_dir() / "packing").glob("*.safetensors")
    with monkeypatch.context() as patched:
        patched.setattr(packing, "first_fit_decreasing", _must_not_run)
        again = packing.packing_plan(lengths, 64)  # read back, not planned again
    assert np.array_equal(again[0], items) and np.array_equal(again[1], offsets)
    assert len(packing.packing_plan(lengths, 80)[1]) < len(offsets)  # another capacity, another plan
    # A plan that does not fit the lengths (here: an overfull row) is planned again, with a warning.
    from safetensors.numpy import save_file

    save_file({"items": items, "offsets": np.array([0, len(items)])}, str(entry))
    with caplog.at_level(logging.WARNING):
        rebuilt = packing.packing_plan(lengths, 64)
    assert np.array_equal(rebuilt[1], offsets) and "overfull" in caplog.text


def test_packing_plan_stays_off_disk_without_the_cache(jsonl, tiny_tokenizer):
    dm = SFTDataModule(train_file=jsonl, tokenizer=tiny_tokenizer, max_length=MAX_LENGTH, packing=True,
                       cache=False)  # fmt: skip
    dm.setup("fit")
    assert len(dm.train_dataset) > 0
    assert not (data_cache.cache_dir() / "packing").exists()
