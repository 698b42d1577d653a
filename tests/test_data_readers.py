"""Data files → records: every reader, and every way a file can be wrong."""

from __future__ import annotations

import importlib.util
import json

import pytest

from lightning_peft.data.readers import read_records
from lightning_peft.errors import DataError, MissingDependencyError

ROWS = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n")
    records = read_records(path)
    assert records.rows == ROWS
    assert records.numbers == [1, 4]
    assert records.where(1) == "train.jsonl line 4"
    assert records.columns == ["prompt", "completion"]


def test_jsonl_malformed_line_names_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"prompt": "x", }\n')
    with pytest.raises(DataError, match=r"train\.jsonl line 3: malformed JSON \(Expecting property name"):
        read_records(path)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '["a", "b"]\n')
    with pytest.raises(DataError, match=r"train\.jsonl line 2: expected a JSON object, got list"):
        read_records(path)


def test_json_list(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(ROWS))
    records = read_records(path)
    assert records.rows == ROWS
    assert records.where(1) == "train.json index 1"


def test_json_object_holding_one_list(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"version": "1.0", "data": ROWS}))
    assert read_records(path).rows == ROWS


def test_json_object_with_two_lists_is_refused(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"train": ROWS, "test": ROWS}))
    with pytest.raises(DataError, match=r"train\.json: a JSON object must hold exactly one list.*found 2"):
        read_records(path)


def test_json_malformed_and_wrong_items(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n{"prompt": "a"},\n{"prompt": }\n]')
    with pytest.raises(DataError, match=r"train\.json line 3: malformed JSON"):
        read_records(path)
    path.write_text(json.dumps([ROWS[0], "oops"]))
    with pytest.raises(DataError, match=r"train\.json index 1: expected a JSON object, got str"):
        read_records(path)
    path.write_text(json.dumps("just a string"))
    with pytest.raises(DataError, match=r"expected a JSON list of objects.*got str"):
        read_records(path)


def test_csv_rows_report_the_line_they_start_on(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('prompt,completion\n"multi\nline",b\nc,d\n')
    records = read_records(path)
    assert records.rows == [{"prompt": "multi\nline", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    assert records.numbers == [2, 4]
    assert records.where(1) == "train.csv line 4"


def test_csv_row_with_too_many_cells(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n")
    with pytest.raises(DataError, match=r"train\.csv line 3: 3 cells but the header has 2 columns"):
        read_records(path)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    records = read_records(path)
    assert records.rows == ROWS
    assert records.where(0) == "train.parquet index 0"


def test_parquet_unreadable(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"train\.parquet: not a readable Parquet file"):
        read_records(path)


def test_saved_dataset_and_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert read_records(tmp_path / "ds").rows == ROWS
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:1])}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert read_records(tmp_path / "dd").rows == ROWS
    DatasetDict({"validation": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS)}).save_to_disk(
        str(tmp_path / "nodd")
    )
    with pytest.raises(DataError, match=r"without a 'train' split \(splits: validation, test\)"):
        read_records(tmp_path / "nodd")


def test_folder_that_is_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match=r"not a `datasets` save_to_disk folder"):
        read_records(tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl' does not exist"):
        read_records(tmp_path / "nope.jsonl")


def test_unknown_extension_lists_the_supported_ones(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"unsupported extension '\.txt'; use JSON Lines \(\.jsonl.*Parquet"):
        read_records(path)


@pytest.mark.parametrize(("name", "content"), [("train.jsonl", "\n\n"), ("train.json", "[]"), ("a.csv", "text\n")])
def test_empty_data_set(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=r"holds no examples"):
        read_records(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl: not UTF-8 text"):
        read_records(path)


def test_missing_pyarrow_gives_the_pip_command(tmp_path, monkeypatch):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"x")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"pip install pyarrow"):
        read_records(path)
