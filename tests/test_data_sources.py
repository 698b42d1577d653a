"""Data sources as written (paths, Hub ids, mappings), their checks, the cache identity, and mixing several."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lightning_peft.data import SFTDataModule
from lightning_peft.data.cache import cache_key
from lightning_peft.data.hub_datasets import hub_error_message, resolved_commit
from lightning_peft.data.mixing import mix, pick
from lightning_peft.data.sources import DataSource, is_hub_id, parse_mixture, parse_source
from lightning_peft.data.tokenization import TokenizedData
from lightning_peft.errors import ConfigError, DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# Parsing -------------------------------------------------------------------------------------------------------


def test_the_forms_of_a_hub_source():
    plain = parse_source("HuggingFaceH4/ultrachat_200k", "train_file")
    assert (plain.path, plain.hub, plain.split, plain.name, plain.revision) == (
        "HuggingFaceH4/ultrachat_200k",
        True,
        "train",
        None,
        None,
    )
    url = parse_source("hf://datasets/HuggingFaceH4/ultrachat_200k@v1.0", "val_file")
    assert (url.path, url.hub, url.split, url.revision) == ("HuggingFaceH4/ultrachat_200k", True, "validation", "v1.0")
    mapping = {"path": "org/name", "name": "sub", "split": "train_sft", "revision": "main", "format": "messages"}
    full = parse_source(mapping, "test_file")
    assert (full.name, full.split, full.revision, full.format, full.setting) == (
        "sub",
        "train_sft",
        "main",
        "messages",
        "data.test_file",
    )
    assert full.label == "org/name (subset sub, split train_sft, revision main)"
    assert parse_source("org/name", "predict_file").split == "test"


def test_a_local_path_wins_over_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("data/train")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train").mkdir()
    assert not is_hub_id("data/train")
    local = parse_source("data/train", "train_file")
    assert (local.hub, local.split, local.label) == (False, None, "data/train")
    # A data file name is always local, so a typo reports a missing file instead of a Hub lookup.
    for name in ("data/missing.jsonl", "missing.jsonl", "./org/name", "/abs/org/name", "a/b/c", "~/x"):
        assert not is_hub_id(name), name


@pytest.mark.parametrize(
    ("value", "setting", "match"),
    [
        ({"path": "org/name", "subset": "x"}, "train_file", r"`train_file`: unknown keys subset \(the keys are path"),
        ({"path": ""}, "train_file", r"`path`='' must be a local path or a Hub data set id"),
        ({"path": "org/name", "split": 3}, "val_file", r"`val_file`: `split`=3 must be a non-empty string"),
        ({"path": "org/name", "weight": 2}, "train_file", r"weight apply to entries of data\.train_datasets only"),
        ({"path": "org/name", "format": "sharegpt"}, "train_file", r"`format`='sharegpt' must be one of auto"),
        ({"path": "org/name", "columns": {"bogus": "x"}}, "train_file", r"`columns`=\{'bogus': 'x'\} must map"),
        (
            {"path": "x.jsonl", "split": "train"},
            "train_file",
            r"split apply to Hub data sets, but 'x\.jsonl' is a local",
        ),
        ({"path": "hf://datasets/a/b@v1", "revision": "v2"}, "train_file", r"names revision 'v1' but `revision`='v2'"),
        ("hf://datasets/not-an-id", "train_file", r"`train_file\.path`='hf://datasets/not-an-id' is not a Hub"),
        (3, "train_file", r"`train_file`=3 must be a path, a Hub data set id"),
    ],
)
def test_source_errors_name_the_setting_and_value(value, setting, match):
    with pytest.raises(ConfigError, match=match):
        parse_source(value, setting)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"path": "org/name", "weight": 1, "count": 2}, r"give `weight` \(1\) or `count` \(2\), not both"),
        ({"path": "org/name", "weight": 0}, r"`weight`=0 must be a number above 0"),
        ({"path": "org/name", "count": 1.5}, r"`count`=1\.5 must be an integer of at least 1"),
    ],
)
def test_mixture_entry_errors(entry, match):
    with pytest.raises(ConfigError, match=r"`train_datasets\[1\]`: " + match):
        parse_mixture(["org/other", entry])
    with pytest.raises(ConfigError, match=r"`train_datasets`=\[\] must be a non-empty list"):
        parse_mixture([])


def test_the_data_module_reports_every_source_problem_at_once():
    with pytest.raises(ConfigError) as info:
        SFTDataModule(
            train_file="a.jsonl",
            train_datasets=[{"path": "org/name", "count": 0}],
            val_file={"path": "org/name", "weight": 1},
        )
    message = str(info.value)
    assert message.startswith("SFTDataModule: ") and "\n" not in message
    assert "`train_file` and `train_datasets` were both given" in message
    assert "`train_datasets[0]`: `count`=0" in message
    assert "`val_file`: weight apply to entries of data.train_datasets only" in message


# The Hub side, without a Hub -----------------------------------------------------------------------------------


class FakeDataset:
    def __init__(self, filename: str, fingerprint: str = "f0") -> None:
        self.cache_files = [{"filename": filename}]
        self._fingerprint = fingerprint

    def __len__(self) -> int:
        return 3


def test_the_commit_is_read_from_the_datasets_cache_path():
    sha = "0123456789abcdef0123456789abcdef01234567"
    path = f"/cache/datasets/org___name/default/0.0.0/{sha}/name-train.arrow"
    assert resolved_commit(FakeDataset(path)) == sha
    assert resolved_commit(FakeDataset("/somewhere/else.arrow")) is None


def test_the_cache_identity_covers_id_subset_split_revision_and_commit(tiny_tokenizer):
    from lightning_peft.data.hub_datasets import HubData

    sha, other = "a" * 40, "b" * 40
    base = parse_source({"path": "org/name", "name": "sub", "split": "train", "revision": "main"}, "train_file")
    variants = [
        base,
        parse_source({"path": "org/other", "name": "sub", "split": "train", "revision": "main"}, "train_file"),
        parse_source({"path": "org/name", "name": "sub2", "split": "train", "revision": "main"}, "train_file"),
        parse_source({"path": "org/name", "name": "sub", "split": "test", "revision": "main"}, "train_file"),
        parse_source({"path": "org/name", "name": "sub", "split": "train", "revision": "v2"}, "train_file"),
    ]
    digests = {HubData(source, FakeDataset(f"/c/{sha}/x.arrow")).digest() for source in variants}
    digests.add(HubData(base, FakeDataset(f"/c/{other}/x.arrow")).digest())
    assert len(digests) == len(variants) + 1
    again = HubData(base, FakeDataset(f"/c/{sha}/x.arrow")).digest()
    assert again in digests
    keys = {cache_key("ignored", {"format": "auto"}, tiny_tokenizer, d) for d in digests}
    assert len(keys) == len(digests)


def test_hub_errors_are_one_line_with_the_fix(monkeypatch):
    from lightning_peft.data import hub_datasets

    source = parse_source({"path": "org/name", "split": "dev"}, "train_file")
    for offline in (False, True):  # a wrong split is a wrong split, online or from the cache
        monkeypatch.setattr(hub_datasets, "_offline", lambda offline=offline: offline)
        message = hub_error_message(source, ValueError("Unknown split \"dev\". Should be one of ['train']."))
        assert message.startswith("`data.train_file`='org/name': Unknown split") and "set `split`" in message
    missing = FileNotFoundError("Dataset 'org/name' doesn't exist\non the Hub")
    message = hub_error_message(source, missing)
    assert "HF_HUB_OFFLINE=1 and the `datasets` cache cannot provide the Hub data set org/name (split dev)" in message
    monkeypatch.setattr(hub_datasets, "_offline", lambda: False)
    message = hub_error_message(source, missing)
    assert "\n" not in message and "check the path or the id" in message and "doesn't exist on the Hub" in message
    message = hub_error_message(source, ConnectionError("Couldn't reach 'org/name' on the Hub"))
    assert "the Hub is unreachable for org/name (split dev)" in message and "HF_ENDPOINT" in message


# Mixing --------------------------------------------------------------------------------------------------------


def tokenized(n: int, fmt: str = "text", start: int = 0) -> TokenizedData:
    """n examples; example i is [start + i] * (i % 3 + 2) tokens, labelled, from record i."""
    ids = [np.full(i % 3 + 2, start + i, np.int32) for i in range(n)]
    return TokenizedData.from_examples(((x, x) for x in ids), range(n), [False] * n, [], n_records=n, format=fmt)


def source(**amount) -> DataSource:
    return DataSource(path="x", hub=False, setting="data.train_datasets[0]", **amount)


def firsts(data: TokenizedData) -> list[int]:
    return [int(data.example(i)[0][0]) for i in range(len(data))]


def test_pick_takes_whole_passes_before_repeating():
    chosen = pick(4, 10, np.random.default_rng(0))
    assert len(chosen) == 10 and sorted(chosen[:4]) == sorted(chosen[4:8]) == [0, 1, 2, 3]
    assert len(set(chosen[8:])) == 2
    assert len(set(pick(10, 4, np.random.default_rng(0)))) == 4  # fewer: no repeats


def test_mix_takes_counts_and_weights_reproducibly():
    parts = [tokenized(10, "text"), tokenized(4, "alpaca", start=100)]
    plan = [source(count=3), source(weight=1.5)]
    mixed = mix(parts, plan, seed=1)
    values = firsts(mixed)
    assert len(mixed) == 9 and mixed.format == "mixed"
    assert sum(v < 100 for v in values) == 3 and sum(v >= 100 for v in values) == 6
    assert {v for v in values if v >= 100} == {100, 101, 102, 103}  # a whole pass, then two repeats
    for i, v in enumerate(values):  # every example keeps its own tokens and labels
        ids, labels = mixed.example(i)
        assert (ids == v).all() and (labels == v).all() and len(ids) == (v % 100) % 3 + 2
    assert firsts(mix(parts, plan, seed=1)) == values
    assert firsts(mix(parts, plan, seed=2)) != values
    # Repeats share their record, so a train/validation split keeps all copies of an example on one side.
    assert mixed.n_records == 3 + 4
    same = [mixed.record_index[i] for i, v in enumerate(values) if v == values[-1]]
    assert len(same) == 2 and len(set(same)) == 1
    assert len(mix(parts, [source(), source()], seed=0)) == 14  # no weight, no count: all of each, as Axolotl


def test_a_weight_that_leaves_nothing_is_an_error():
    with pytest.raises(DataError, match=r"`data.train_datasets\[0\]`: weight 0.01 of its 10 examples leaves none"):
        mix([tokenized(10)], [source(weight=0.01)], seed=0)


def test_a_mixture_of_local_files_with_their_own_formats_and_columns(tmp_path, tiny_tokenizer):
    alpaca = write_jsonl(
        tmp_path / "alpaca.jsonl", [{"instruction": f"do {i}", "output": f"done {i}"} for i in range(6)]
    )
    notes = write_jsonl(tmp_path / "notes.jsonl", [{"body": f"note number {i}"} for i in range(4)])
    datasets = [
        {"path": alpaca, "format": "alpaca", "count": 4},
        {"path": notes, "format": "text", "columns": {"text": "body"}, "weight": 2},
    ]
    dm = SFTDataModule(train_datasets=datasets, tokenizer=tiny_tokenizer, max_length=400, val_fraction=0.25, seed=3)
    dm.setup("fit")
    assert dm.stats["train_datasets[0]"]["examples"] == 6 and dm.stats["train_datasets[1]"]["examples"] == 4
    assert len(dm.train_dataset) + len(dm.val_dataset) == 4 + 8
    texts = [tiny_tokenizer.decode(dm.train_dataset[i]["input_ids"]) for i in range(len(dm.train_dataset))]
    assert any("### Response:" in t for t in texts) and any(t.startswith("note number") for t in texts)
    again = SFTDataModule(train_datasets=datasets, tokenizer=tiny_tokenizer, max_length=400, val_fraction=0.25, seed=3)
    again.setup("fit")
    assert [again.train_dataset[i]["input_ids"].tolist() for i in range(len(again.train_dataset))] == [
        dm.train_dataset[i]["input_ids"].tolist() for i in range(len(dm.train_dataset))
    ]


def test_a_missing_local_file_in_a_mixture_names_its_entry(tmp_path, tiny_tokenizer):
    good = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    dm = SFTDataModule(train_datasets=[good, str(tmp_path / "gone.jsonl")], tokenizer=tiny_tokenizer)
    with pytest.raises(
        DataError, match=r"gone\.jsonl' does not exist; check the path given to data\.train_datasets\[1\]"
    ):
        dm.setup("fit")


def test_a_mapping_sets_the_format_and_columns_of_its_own_file(tmp_path, tiny_tokenizer):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"question": "Why?", "answer": "Because."}])
    tests = write_jsonl(tmp_path / "t.jsonl", [{"body": "a test text"}])
    dm = SFTDataModule(
        format="alpaca",  # the run's format, which neither file is in
        predict_file={
            "path": prompts,
            "format": "prompt_completion",
            "columns": {"prompt": "question", "completion": "answer"},
        },
        test_file={"path": tests, "format": "text", "columns": {"text": "body"}},
        tokenizer=tiny_tokenizer,
        max_length=64,
    )
    dm.setup()
    assert dm.predict_dataset[0]["reference"] == "Because."
    assert tiny_tokenizer.decode(dm.predict_dataset[0]["input_ids"]).endswith("Why?")
    assert dm.stats["test"]["examples"] == 1
    assert tiny_tokenizer.decode(dm.test_dataset[0]["input_ids"]).startswith("a test text")


def test_each_source_maps_its_own_roles(tmp_path, tiny_tokenizer):
    """A mixture entry's `roles` replaces `data.roles` for its file; the loss is on the turns mapped to assistant."""
    turn = [{"role": "human", "content": "Hi"}]
    bot = write_jsonl(tmp_path / "bot.jsonl", [{"messages": [*turn, {"role": "bot", "content": "Hello!"}]}] * 2)
    wizard = write_jsonl(tmp_path / "wizard.jsonl", [{"messages": [*turn, {"role": "wizard", "content": "Hm."}]}])
    datasets = [bot, {"path": wizard, "roles": {"wizard": "assistant"}}]
    dm = SFTDataModule(train_datasets=datasets, roles={"bot": "assistant"}, tokenizer=tiny_tokenizer, max_length=64)
    dm.setup("fit")
    answers = set()
    for i in range(len(dm.train_dataset)):
        example = dm.train_dataset[i]
        answers.add(tiny_tokenizer.decode(example["input_ids"][example["labels"] != -100]))
    assert answers == {"Hello!<|im_end|>", "Hm.<|im_end|>"}
    with pytest.raises(ConfigError, match=r"`train_datasets\[0\]`: `roles` maps \{'x': 'bot'\} to no standard role"):
        SFTDataModule(train_datasets=[{"path": bot, "roles": {"x": "bot"}}])
    unmapped = SFTDataModule(train_datasets=[bot, wizard], roles={"bot": "assistant"}, tokenizer=tiny_tokenizer)
    with pytest.raises(DataError, match=r"^wizard\.jsonl line 1: field `messages` item 1: role 'wizard' is not one"):
        unmapped.setup("fit")
