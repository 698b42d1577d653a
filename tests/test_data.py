"""SFTDataModule: argument checks, batches, the train/validation split, the cache, logging and a Trainer run."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from lightning_peft.data import SFTDataModule, preparation
from lightning_peft.errors import ConfigError, DataError

EOS = "<|im_end|>"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def chat_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        answer = "a" * int(rng.integers(1, 30))
        rows.append(
            {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": answer}]}
        )
    return rows


@pytest.fixture
def chat_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", chat_rows(20))


def make(train_file, tokenizer, **kwargs):
    dm = SFTDataModule(train_file, tokenizer=tokenizer, **kwargs)
    dm.setup("fit")
    return dm


# Arguments ---------------------------------------------------------------------------------------------------


def test_every_argument_problem_in_one_message():
    with pytest.raises(ConfigError) as info:
        SFTDataModule(
            "train.jsonl",
            val_file="val.jsonl",
            val_fraction=0.1,
            max_length=1,
            batch_size=0,
            columns={"bogus": "x", "prompt": ""},
        )
    message = str(info.value)
    assert "`val_file`='val.jsonl' and `val_fraction`=0.1 were both given" in message
    assert "`max_length`=1 must be an integer of at least 2" in message
    assert "`batch_size`=0 must be an integer of at least 1" in message
    assert "`columns` has unknown fields bogus; the fields are messages, prompt" in message
    assert "`columns` values must be column names (non-empty strings), got {'prompt': ''}" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_fraction": 1.5}, r"`val_fraction`=1\.5 must be a number between 0 and 1"),
        ({"val_fraction": 0.0}, r"`val_fraction`=0\.0 must be a number between 0 and 1"),
        ({"val_batch_size": 0}, r"`val_batch_size`=0 must be an integer of at least 1"),
        ({"num_workers": -1}, r"`num_workers`=-1 must be an integer of at least 0"),
        ({"format": "sharegpt"}, r"`format`='sharegpt' must be one of auto, messages, prompt_completion"),
        ({"columns": ["text"]}, r"`columns`=\['text'\] must be a mapping"),
        ({"roles": ["gpt"]}, r"`roles`=\['gpt'\] must map the data's role names to system, user, assistant, tool"),
        ({"roles": {"bot": "ai"}}, r"`roles` maps \{'bot': 'ai'\} to no standard role; map each role name to one"),
        ({"train_file": ""}, r"`train_file`='' must be the path of a data file"),
    ],
)
def test_argument_checks(kwargs, match):
    kwargs = {"train_file": "train.jsonl", **kwargs}
    with pytest.raises(ConfigError, match=match):
        SFTDataModule(**kwargs)


def test_setup_without_tokenizer(chat_file):
    with pytest.raises(ConfigError, match=r"`tokenizer`=None: the data module needs a tokenizer"):
        SFTDataModule(chat_file).setup("fit")


def test_tokenizer_by_name_is_loaded(chat_file, tiny_model_dir, tiny_tokenizer):
    dm = make(chat_file, str(tiny_model_dir))
    assert dm.tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    assert dm.hparams["tokenizer"] == str(tiny_model_dir)


def test_tokenizer_object_is_not_a_hyperparameter(chat_file, tiny_tokenizer):
    dm = SFTDataModule(chat_file, tokenizer=tiny_tokenizer, max_length=64)
    assert dm.tokenizer is tiny_tokenizer
    assert "tokenizer" not in dm.hparams and dm.hparams["max_length"] == 64


def test_public_attributes(chat_file, tiny_tokenizer):
    from pathlib import Path

    dm = make(Path(chat_file), tiny_tokenizer, packing=True, max_length=100)
    assert dm.train_file == chat_file
    assert dm.packing is True and dm.max_length == 100 and dm.tokenizer is tiny_tokenizer


# Batches -----------------------------------------------------------------------------------------------------


def test_padded_batches(chat_file, tiny_tokenizer):
    dm = make(chat_file, tiny_tokenizer, batch_size=4)
    batches = list(dm.train_dataloader())
    assert sum(len(b["input_ids"]) for b in batches) == 20
    for batch in batches:
        assert set(batch) == {"input_ids", "labels", "attention_mask"}
        assert all(t.dtype == torch.long and t.shape == batch["input_ids"].shape for t in batch.values())
        # Dynamic padding: every batch is as long as its longest example.
        assert batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1]
        assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
        supervised = batch["input_ids"][batch["labels"] != -100]
        assert (supervised == tiny_tokenizer.eos_token_id).sum() == len(batch["input_ids"])


def test_group_by_length_batches_similar_lengths(tmp_path, tiny_tokenizer):
    rows = [{"text": "x" * n} for n in np.random.default_rng(0).integers(1, 200, size=64)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)

    def padding(dm):
        return sum(int((b["attention_mask"] == 0).sum()) for b in dm.train_dataloader())

    grouped = padding(make(path, tiny_tokenizer, batch_size=4))
    shuffled = padding(make(path, tiny_tokenizer, batch_size=4, group_by_length=False))
    assert grouped < shuffled / 2


def test_plain_shuffle_is_seeded(chat_file, tiny_tokenizer):
    def order(seed):
        loader = make(chat_file, tiny_tokenizer, batch_size=20, group_by_length=False, seed=seed).train_dataloader()
        return next(iter(loader))["input_ids"].tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)


def test_packed_batches(chat_file, tiny_tokenizer):
    dm = make(chat_file, tiny_tokenizer, packing=True, max_length=128, batch_size=2)
    batches = list(dm.train_dataloader())
    assert all(set(b) == {"input_ids", "labels", "position_ids"} for b in batches)
    assert all(b["input_ids"].shape[1] <= 128 for b in batches)
    assert sorted(j for row in dm.train_dataset.rows for j in row) == list(range(20))
    # Each example starts at position 0 with an unsupervised first token (padding adds more position-0 starts).
    starts = [b["labels"][b["position_ids"] == 0] for b in batches]
    assert sum(len(s) for s in starts) >= 20 and all((s == -100).all() for s in starts)
    stats = dm.stats["train"]
    assert stats["rows"] == sum(len(b["input_ids"]) for b in batches) < 20
    assert stats["packing_efficiency"] == pytest.approx(stats["tokens"] / (stats["rows"] * 128), abs=1e-4)


# Train / validation ------------------------------------------------------------------------------------------


def test_val_fraction_split_is_deterministic_and_disjoint(chat_file, tiny_tokenizer):
    def records(seed):
        dm = make(chat_file, tiny_tokenizer, val_fraction=0.25, seed=seed)
        return dm.train_dataset.data.record_index.tolist(), dm.val_dataset.data.record_index.tolist(), dm

    train, val, dm = records(7)
    assert len(val) == 5 and len(train) == 15
    assert sorted(train + val) == list(range(20))
    assert records(7)[:2] == (train, val)
    assert sorted(records(8)[1]) != sorted(val)
    assert dm.stats["val"]["examples_read"] == 5 and dm.stats["train"]["examples_read"] == 15
    # Validation is in a fixed order, longest first.
    lengths = [int(n) for batch in dm.val_dataloader() for n in batch["attention_mask"].sum(1)]
    assert lengths == sorted(lengths, reverse=True)


def test_val_fraction_that_leaves_a_side_empty(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "one.jsonl", chat_rows(1))
    with pytest.raises(DataError, match=r"`val_fraction`=0\.5 of the 1 records in .*one\.jsonl leaves no training"):
        make(path, tiny_tokenizer, val_fraction=0.5)


def test_val_file(tmp_path, chat_file, tiny_tokenizer, caplog):
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "p", "completion": "c"}] * 3)
    dm = make(chat_file, tiny_tokenizer, val_file=val, val_batch_size=2)
    assert "format 'messages' but the validation data in 'prompt_completion'" in caplog.text
    assert dm.stats["val"]["examples"] == 3
    assert [len(b["input_ids"]) for b in dm.val_dataloader()] == [2, 1]


def test_no_validation_data_means_no_val_dataloader(chat_file, tiny_tokenizer):
    from lightning.pytorch.utilities.model_helpers import is_overridden

    dm = make(chat_file, tiny_tokenizer)
    assert "val" not in dm.stats
    assert not is_overridden("val_dataloader", dm)  # Lightning then skips validation


# Errors surface with the file and row ------------------------------------------------------------------------


def test_bad_row_error_names_file_and_line(tmp_path, tiny_tokenizer):
    rows = [*chat_rows(6), {"messages": "hello"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(
        DataError, match=r"train\.jsonl line 7: field `messages` must be a list of \{role, content\} objects, got str"
    ):
        make(path, tiny_tokenizer)


def test_missing_train_file(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=r"missing\.jsonl' does not exist"):
        make(str(tmp_path / "missing.jsonl"), tiny_tokenizer)


def test_truncation_off_error(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "short"}, {"text": "x" * 40}])
    with pytest.raises(DataError, match=r"train\.jsonl line 2: the example is 41 tokens long, more than max_length=16"):
        make(path, tiny_tokenizer, max_length=16, truncation=False)


def test_all_examples_dropped(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "x" * 40, "completion": "y"}])
    with pytest.raises(DataError, match=r"none of the 1 train examples has a supervised token left"):
        make(path, tiny_tokenizer, max_length=16)


def test_format_detected_and_counts_logged(tmp_path, tiny_tokenizer, caplog):
    rows = [
        {"prompt": "p", "completion": "c"},
        {"prompt": "p", "completion": "c" * 40},
        {"prompt": "x" * 40, "completion": "c"},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="lightning_peft.data"):
        dm = make(path, tiny_tokenizer, max_length=16, packing=True)
    text = caplog.text
    assert "Detected the data format 'prompt_completion'" in text
    assert "1 of 3 train examples were truncated to max_length=16" in text
    assert "1 of 3 train examples were dropped: no supervised token left" in text
    assert "% of the row tokens are real" in text
    assert dm.stats["train"] == {
        "examples_read": 3,
        "examples": 2,
        "dropped": 1,
        "truncated": 1,
        "tokens": 3 + 16,  # "p", "c", EOS; then "p" + 40 "c"s + EOS cut to 16
        "supervised_tokens": 2 + 15,
        "rows": 2,
        "packing_efficiency": pytest.approx(19 / 32, abs=1e-4),
    }


# Cache -------------------------------------------------------------------------------------------------------


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """Counts tokenizer runs and file reads; the cache lives in this test's own folder."""
    monkeypatch.setenv("LPEFT_DATA_CACHE", str(tmp_path / "cache"))
    calls = {"tokenize": 0, "read": 0}
    real_tokenize, real_read = preparation.tokenize_chunks, preparation.row_chunks

    def tokenize(*args, **kwargs):
        calls["tokenize"] += 1
        return real_tokenize(*args, **kwargs)

    def read(*args, **kwargs):
        calls["read"] += 1
        return real_read(*args, **kwargs)

    monkeypatch.setattr(preparation, "tokenize_chunks", tokenize)
    monkeypatch.setattr(preparation, "row_chunks", read)
    return calls


def _batches(dm):
    return [{k: v.tolist() for k, v in b.items()} for b in dm.train_dataloader()]


def test_cache_hit_skips_reading_and_tokenizing(chat_file, tiny_tokenizer, counted, tmp_path, caplog):
    first = make(chat_file, tiny_tokenizer, val_fraction=0.2)
    assert counted == {"tokenize": 1, "read": 1}
    files = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 1 and not list((tmp_path / "cache").glob(".*"))  # no staging file left
    with caplog.at_level(logging.INFO, logger="lightning_peft.data"):
        second = make(chat_file, tiny_tokenizer, val_fraction=0.2)
    assert counted == {"tokenize": 1, "read": 1}
    assert "format messages, tokenized by an earlier run" in caplog.text
    assert second.stats == first.stats
    assert _batches(second) == _batches(first)


@pytest.mark.parametrize(
    "change",
    [
        {"max_length": 100},
        {"train_on_prompt": True},
        {"truncation": False},
        {"format": "messages"},
        {"columns": {"text": "messages"}},
        {"roles": {"gpt": "user"}},
    ],
)
def test_cache_key_changes_with_settings(chat_file, tiny_tokenizer, counted, change):
    make(chat_file, tiny_tokenizer)
    make(chat_file, tiny_tokenizer, **change)
    assert counted["tokenize"] == 2


def test_cache_key_changes_with_data_and_tokenizer(tmp_path, tiny_tokenizer, counted):
    import copy

    path = write_jsonl(tmp_path / "train.jsonl", chat_rows(5))
    make(path, tiny_tokenizer)
    write_jsonl(tmp_path / "train.jsonl", chat_rows(5, seed=1))
    make(path, tiny_tokenizer)
    assert counted["tokenize"] == 2
    other = copy.deepcopy(tiny_tokenizer)
    other.chat_template = tiny_tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    make(path, other)
    assert counted["tokenize"] == 3


def test_cache_off_always_tokenizes(chat_file, tiny_tokenizer, counted, tmp_path):
    make(chat_file, tiny_tokenizer, cache=False)
    make(chat_file, tiny_tokenizer, cache=False)
    assert counted["tokenize"] == 2
    assert not (tmp_path / "cache").exists()


def test_damaged_cache_entry_is_rebuilt(chat_file, tiny_tokenizer, counted, tmp_path):
    make(chat_file, tiny_tokenizer)
    (entry,) = (tmp_path / "cache").glob("*.safetensors")
    entry.write_bytes(b"garbage")
    dm = make(chat_file, tiny_tokenizer)
    assert counted["tokenize"] == 2 and dm.stats["train"]["examples"] == 20


def test_saved_dataset_folder_through_the_cache(tmp_path, tiny_tokenizer, counted):
    from datasets import Dataset

    Dataset.from_list(chat_rows(4)).save_to_disk(str(tmp_path / "ds"))
    assert make(str(tmp_path / "ds"), tiny_tokenizer).stats["train"]["examples"] == 4
    make(str(tmp_path / "ds"), tiny_tokenizer)
    assert counted["tokenize"] == 1


# Trainer -----------------------------------------------------------------------------------------------------


def test_trainer_fit_with_packing_and_validation(chat_file, tiny_model_dir, tiny_tokenizer):
    import lightning.pytorch as pl
    from transformers import AutoModelForCausalLM

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
            self.tokenizer = tiny_tokenizer  # the data module takes it from here: it was given none
            self.val_batches = 0

        def training_step(self, batch, _):
            return self.model(**batch, use_cache=False).loss

        def validation_step(self, batch, _):
            self.val_batches += 1
            assert "attention_mask" not in batch

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = SFTDataModule(chat_file, val_fraction=0.2, packing=True, max_length=96)
    module = Tiny()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    assert dm.tokenizer is tiny_tokenizer
    assert trainer.global_step == 2 * len(dm.train_dataloader())
    assert module.val_batches == 2 * len(dm.val_dataloader())


def test_test_file_feeds_the_test_loop_only(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"q{i} ", "completion": f"a{i}"} for i in range(3)]
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = SFTDataModule(test_file=str(test_file), tokenizer=tiny_tokenizer, batch_size=2)
    data.setup("test")
    batches = list(data.test_dataloader())
    assert sum(len(b["input_ids"]) for b in batches) == 3
    assert data.stats["test"]["examples"] == 3 and data.train_dataset is None


def test_testing_without_a_test_file_says_how_to_fix_it(tiny_tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="`test_file`=None: testing needs its own data; set data.test_file"):
        SFTDataModule(str(tmp_path / "train.jsonl"), tokenizer=tiny_tokenizer).setup("test")
