"""Prediction: prompts rendered like the training data, left-padded batches, generation and the JSONL writer."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from lightning_peft.callbacks import PredictionWriter
from lightning_peft.callbacks.prediction_writer import in_file_order
from lightning_peft.data import SFTDataModule
from lightning_peft.data.formats import render_prompts, render_records
from lightning_peft.data.readers import Records
from lightning_peft.errors import ConfigError, DataError
from lightning_peft.module import PeftCausalLM

GEN = "<|im_start|>assistant\n"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def chat(*turns):
    return [{"role": role, "content": content} for role, content in turns]


def prompts(tmp_path, tokenizer, rows, **kwargs):
    """{row index: (decoded prompt tokens, reference)} from the predict dataset of a data module."""
    dm = SFTDataModule(predict_file=write_jsonl(tmp_path / "prompts.jsonl", rows), tokenizer=tokenizer, **kwargs)
    dm.setup("predict")
    out = {}
    for i in range(len(dm.predict_dataset)):
        item = dm.predict_dataset[i]
        out[item["index"]] = (tokenizer.decode(item["input_ids"]), item["reference"])
    return out, dm


# Prompt rendering, one format at a time ----------------------------------------------------------------------


def test_messages_prompts(tmp_path, tiny_tokenizer):
    rows = [
        {"messages": chat(("user", "hi"), ("assistant", "hello"))},
        {
            "messages": chat(
                ("system", "be brief"), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")
            )
        },
        {"messages": chat(("user", "no answer yet"))},
        {"messages": chat(("user", "q1"), ("assistant", "a1"), ("user", "q2"))},
    ]
    out, dm = prompts(tmp_path, tiny_tokenizer, rows)
    tokens = sum(len(item["input_ids"]) for item in dm.predict_dataset)
    assert dm.stats["predict"] == {"prompts": 4, "tokens": tokens, "truncated": 0}
    assert out[0] == ("<|im_start|>user\nhi<|im_end|>\n" + GEN, "hello")
    # Everything before the final assistant turn, earlier answers included; that turn is the reference.
    assert out[1] == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\na<|im_end|>\n"
        "<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n" + GEN,
        "d",
    )
    # A conversation that does not end with an assistant turn is waiting for one: all of it is the prompt.
    assert out[2] == ("<|im_start|>user\nno answer yet<|im_end|>\n" + GEN, None)
    assert out[3][0].endswith("<|im_start|>user\nq2<|im_end|>\n" + GEN) and out[3][1] is None


def test_prompt_completion_prompts(tmp_path, tiny_tokenizer):
    rows = [
        {"prompt": "2 + 2 =", "completion": " 4"},
        {"prompt": "no completion"},
        {"prompt": chat(("user", "hi")), "completion": chat(("assistant", "hello"))},
    ]
    out, dm = prompts(tmp_path, tiny_tokenizer, rows)
    assert dm.predict_dataset.data.format == "prompt_completion"
    assert out == {
        0: ("2 + 2 =", " 4"),
        1: ("no completion", None),
        2: ("<|im_start|>user\nhi<|im_end|>\n" + GEN, "hello"),
    }


def test_alpaca_prompts(tmp_path, tiny_tokenizer):
    rows = [
        {"instruction": "Add.", "input": "2 and 2", "output": "4"},
        {"instruction": "Say hi."},  # no output: the format is still recognized from the instruction
    ]
    out, _ = prompts(tmp_path, tiny_tokenizer, rows)
    assert out[0][0].endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 2\n\n### Response:\n")
    assert out[0][1] == "4"
    assert out[1][0].startswith("Below is an instruction that describes a task. Write")
    assert out[1] == (out[1][0], None) and out[1][0].endswith("### Instruction:\nSay hi.\n\n### Response:\n")


def test_text_prompts_and_column_mapping(tmp_path, tiny_tokenizer):
    out, _ = prompts(tmp_path, tiny_tokenizer, [{"body": "Once upon a time"}], columns={"text": "body"})
    assert out == {0: ("Once upon a time", None)}


@pytest.mark.parametrize(
    "row",
    [
        {"messages": chat(("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))},
        {"prompt": chat(("user", "hi")), "completion": chat(("assistant", "hello"))},
        {"prompt": "2 + 2 =", "completion": " 4"},
        {"instruction": "Add.", "input": "2 and 2", "output": "4"},
    ],
)
def test_prompt_is_the_start_of_the_training_text(tmp_path, tiny_tokenizer, row):
    # One implementation renders both: the prompt ends exactly where the last supervised answer begins.
    records = Records(tmp_path / "x.jsonl", [row])
    (trained,) = render_records(records, "auto", {}, tiny_tokenizer)[1]
    (prompt,) = render_prompts(records, "auto", {}, tiny_tokenizer)[1]
    assert prompt.text == trained.text[: trained.spans[-1][0]]
    assert prompt.special_tokens == trained.special_tokens


def test_prompt_row_errors_name_file_and_line(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=r"prompts\.jsonl line 2: field `prompt` must be a string, got int"):
        prompts(tmp_path, tiny_tokenizer, [{"prompt": "ok"}, {"prompt": 3}])
    with pytest.raises(DataError, match=r"prompts\.jsonl line 1: the prompt is empty"):
        prompts(tmp_path, tiny_tokenizer, [{"text": ""}])
    with pytest.raises(
        DataError, match=r"prompts\.jsonl: cannot detect the data format .* prompt_completion: `prompt`;"
    ):
        prompts(tmp_path, tiny_tokenizer, [{"question": "q"}])


# Length and batches ------------------------------------------------------------------------------------------


def test_long_prompt_is_an_error_without_truncation(tmp_path, tiny_tokenizer):
    rows = [{"text": "short"}, {"text": "x" * 40}]
    with pytest.raises(
        DataError, match=r"prompts\.jsonl line 2: the prompt is 40 tokens long, more than max_length=16"
    ):
        prompts(tmp_path, tiny_tokenizer, rows, max_length=16, truncation=False)


def test_long_prompt_keeps_its_tail_with_truncation(tmp_path, tiny_tokenizer, caplog):
    rows = [{"text": "short"}, {"text": "a" * 30 + "the end of it"}]
    with caplog.at_level(logging.INFO, logger="lightning_peft.data"):
        out, dm = prompts(tmp_path, tiny_tokenizer, rows, max_length=16)
    assert out[1][0] == ("a" * 30 + "the end of it")[-16:]
    assert dm.stats["predict"]["truncated"] == 1
    assert "1 of 2 prompts were longer than max_length=16 and keep only their last 16 tokens" in caplog.text
    assert "predict: 2 prompts from" in caplog.text


def test_batches_are_left_padded(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "p" * n, "completion": f"c{n}"} for n in (3, 9, 5, 1, 7)]
    _, dm = prompts(tmp_path, tiny_tokenizer, rows, val_batch_size=2)
    batches = list(dm.predict_dataloader())
    assert [len(b["index"]) for b in batches] == [2, 2, 1]
    seen = []
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "index", "reference"}
        assert batch["index"].dtype == batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
        mask = batch["attention_mask"]
        # Padding only on the left: every row ends on a real token, and its mask is 0...0 1...1.
        assert (mask[:, -1] == 1).all() and (mask.diff(dim=1) >= 0).all()
        assert (batch["input_ids"][mask == 0] == tiny_tokenizer.pad_token_id).all()
        for row, index in enumerate(batch["index"].tolist()):
            n = (3, 9, 5, 1, 7)[index]
            assert batch["input_ids"][row][mask[row].bool()].tolist() == tiny_tokenizer("p" * n)["input_ids"]
            assert batch["reference"][row] == f"c{n}"
            seen.append(index)
    assert sorted(seen) == list(range(5))


# Configuration errors ----------------------------------------------------------------------------------------


def test_missing_predict_file(tmp_path, tiny_tokenizer):
    dm = SFTDataModule(predict_file=str(tmp_path / "missing.jsonl"), tokenizer=tiny_tokenizer)
    with pytest.raises(DataError, match=r"missing\.jsonl' does not exist; check the path given to data\.predict_file"):
        dm.setup("predict")


def test_predict_without_predict_file(tmp_path, tiny_tokenizer):
    dm = SFTDataModule(write_jsonl(tmp_path / "train.jsonl", [{"text": "t"}]), tokenizer=tiny_tokenizer)
    with pytest.raises(
        ConfigError, match=r"`predict_file`=None: predicting needs a file of prompts; set data\.predict"
    ):
        dm.setup("predict")


def test_predict_reads_no_training_data_and_fit_needs_it(tmp_path, tiny_tokenizer):
    predict_file = write_jsonl(tmp_path / "p.jsonl", [{"text": "t"}])
    dm = SFTDataModule(str(tmp_path / "not-there.jsonl"), predict_file=predict_file, tokenizer=tiny_tokenizer)
    dm.setup("predict")
    assert dm.train_dataset is None and len(dm.predict_dataset) == 1
    only_prompts = SFTDataModule(predict_file=predict_file, tokenizer=tiny_tokenizer)
    only_prompts.setup()  # a direct call prepares every file given
    assert only_prompts.predict_dataset is not None
    with pytest.raises(ConfigError, match=r"`train_file`=None: fit needs the training data"):
        only_prompts.setup("fit")
    with pytest.raises(ConfigError, match=r"`predict_file`='' must be the path of a data file"):
        SFTDataModule(predict_file="")


def test_prediction_writer_argument_checks():
    with pytest.raises(ConfigError) as info:
        PredictionWriter(max_new_tokens=0, temperature=0.0, top_p=1.5)
    assert str(info.value) == (
        "PredictionWriter: `max_new_tokens`=0 must be an integer of at least 1; `temperature`=0.0 must be a number "
        "above 0; `top_p`=1.5 must be a number in (0, 1]."
    )


def test_in_file_order_sorts_and_drops_repeats():
    rows = [{"index": 2, "c": "x"}, {"index": 0, "c": "y"}, {"index": 2, "c": "z"}, {"index": 1, "c": "w"}]
    assert [r["c"] for r in in_file_order(rows)] == ["y", "w", "x"]


# Generation through the Trainer ------------------------------------------------------------------------------


class SpyLM(PeftCausalLM):
    """Records the `generate` calls: their keyword arguments and how many tokens each added."""

    def configure_model(self) -> None:
        super().configure_model()
        self.calls: list[dict] = []
        real = self.model.generate

        def generate(**kwargs):
            output = real(**kwargs)
            self.calls.append({**kwargs, "new_tokens": output.shape[1] - kwargs["input_ids"].shape[1]})
            return output

        self.model.generate = generate


PREDICT_ROWS = [
    {"messages": chat(("user", "What is the capital of France?"), ("assistant", "Paris"))},
    {"messages": chat(("user", "hi"))},
    {"messages": chat(("user", "A longer question " * 4), ("assistant", "ok"))},
]


def predict(tmp_path, model_dir, name, batch_size=2, **writer):
    from helpers import quiet_trainer

    dm = SFTDataModule(
        predict_file=write_jsonl(tmp_path / "prompts.jsonl", PREDICT_ROWS),
        tokenizer=str(model_dir),
        val_batch_size=batch_size,
    )
    module = SpyLM(str(model_dir), adapter={"r": 2})
    writer = PredictionWriter(**{"output_file": str(tmp_path / name / "predictions.jsonl"), **writer})
    quiet_trainer(tmp_path, callbacks=[writer]).predict(module, datamodule=dm, return_predictions=False)
    lines = (tmp_path / name / "predictions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], module, writer


def test_trainer_predict_writes_one_line_per_row_in_order(tmp_path, tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="lightning_peft"):
        rows, module, writer = predict(tmp_path, tiny_model_dir, "first", max_new_tokens=6)
    path = tmp_path / "first" / "predictions.jsonl"
    assert [p.name for p in path.parent.iterdir()] == ["predictions.jsonl"]  # no temporary file left
    assert f"Wrote 3 predictions to {path}" in caplog.text
    assert writer.output_path == path and writer.predictions == rows
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r.get("reference") for r in rows] == ["Paris", None, "ok"]
    keys = {"index", "prompt", "completion"}
    assert [set(r) for r in rows] == [{*keys, "reference"}, keys, {*keys, "reference"}]
    assert rows[0]["prompt"] == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" + GEN
    assert all(isinstance(r["completion"], str) and r["completion"] for r in rows)
    # Greedy by default, with the writer's length; sampling settings are not passed to greedy decoding.
    assert len(module.calls) == 2 and all(0 < c["new_tokens"] <= 6 for c in module.calls)
    assert {k: module.calls[0][k] for k in ("max_new_tokens", "do_sample")} == {"max_new_tokens": 6, "do_sample": False}
    assert "temperature" not in module.calls[0] and "top_p" not in module.calls[0]

    again, _, _ = predict(tmp_path, tiny_model_dir, "second", max_new_tokens=6)
    assert again == rows  # greedy decoding is deterministic
    # Left padding does not change a row's completion: one prompt a batch gives the same text.
    alone, _, _ = predict(tmp_path, tiny_model_dir, "alone", batch_size=1, max_new_tokens=6)
    assert alone == rows


def test_sampling_settings_reach_generate(tmp_path, tiny_model_dir):
    _, module, _ = predict(
        tmp_path, tiny_model_dir, "sampled", max_new_tokens=3, do_sample=True, temperature=0.7, top_p=0.9
    )
    call = module.calls[0]
    assert (call["max_new_tokens"], call["do_sample"], call["temperature"], call["top_p"]) == (3, True, 0.7, 0.9)
    assert call["pad_token_id"] == module.tokenizer.pad_token_id


def test_predict_step_defaults_without_the_writer(tiny_model_dir, tiny_tokenizer):
    module = SpyLM(str(tiny_model_dir), adapter={"r": 2})
    module.configure_model()
    module.model.eval()
    ids = torch.tensor([tiny_tokenizer("hi")["input_ids"]])
    with torch.no_grad():
        (row,) = module.predict_step({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 0)
    assert {k: module.calls[0][k] for k in ("max_new_tokens", "do_sample")} == {
        "max_new_tokens": 128,
        "do_sample": False,
    }
    assert row["index"] is None and row["prompt"] == "hi" and "reference" not in row


def test_default_output_file_is_in_the_log_dir(tmp_path, tiny_model_dir):
    from helpers import quiet_trainer

    dm = SFTDataModule(predict_file=write_jsonl(tmp_path / "p.jsonl", [{"text": "abc"}]), tokenizer=str(tiny_model_dir))
    writer = PredictionWriter(max_new_tokens=2)
    trainer = quiet_trainer(tmp_path / "run", callbacks=[writer])
    trainer.predict(PeftCausalLM(str(tiny_model_dir), adapter={"r": 2}), datamodule=dm)
    assert writer.output_path == tmp_path / "run" / "predictions.jsonl"
    assert len(writer.output_path.read_text().splitlines()) == 1


# The command line --------------------------------------------------------------------------------------------


@pytest.fixture
def restore_library_logger():
    """`lpeft` configures the `lightning_peft` logger; put it back so later tests' caplog still sees records."""
    logger = logging.getLogger("lightning_peft")
    state = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate = state[0], state[1]
    logger.setLevel(state[2])


def write_config(tmp_path, model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Q: ", "completion": "A"}] * 4)
    config = {
        "model": {"model_name_or_path": str(model_dir), "adapter": {"r": 2}},
        "data": {"train_file": train, "max_length": 64, "batch_size": 2},
        "trainer": {"default_root_dir": str(tmp_path / "runs"), "enable_progress_bar": False, "logger": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return str(path)


def test_lpeft_predict(tmp_path, tiny_model_dir, restore_library_logger, capsys):
    from lightning_peft.cli import main

    config = write_config(tmp_path, tiny_model_dir)
    prompts_file = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Q{i}: ", "completion": "A"} for i in range(3)])
    out = tmp_path / "out" / "completions.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "predict",
                "--config",
                config,
                "--data.predict_file",
                prompts_file,
                "--trainer.callbacks+=lightning_peft.callbacks.PredictionWriter",
                "--trainer.callbacks.init_args.output_file",
                str(out),
                "--trainer.callbacks.init_args.max_new_tokens",
                "3",
            ]
        )
    assert exit_info.value.code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["prompt"], r["reference"]) for r in rows] == [(i, f"Q{i}: ", "A") for i in range(3)]
    assert f"Wrote 3 predictions to {out}" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", config])
    assert exit_info.value.code == 2
    assert "lpeft: error: `predict_file`=None: predicting needs a file of prompts" in capsys.readouterr().err
