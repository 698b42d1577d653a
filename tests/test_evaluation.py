"""`lpeft eval`: harness scores for a base and its adapters, side by side; local task files; one-line errors.

The scores must be the harness's own over the model lightning-peft loaded: a multiple-choice accuracy equals the
argmax of summed log-probabilities computed here by hand (with the adapter active, or not), and a generation
task's replies equal greedy decoding done here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hub_server import error_line, lpeft, make_adapter
from tolerance import TINY_FORWARD, assert_close_reordered, reordering_tolerance

from lightning_peft.evaluation import format_table, metric_rows, resolve_tasks
from lightning_peft.evaluation.report import MetricRow

pytest.importorskip("lm_eval")

QUESTIONS = [
    ("Is the sky blue?", ["yes", "no"], 0),
    ("Is fire cold?", ["yes", "no"], 1),
    ("Two plus two?", ["four", "five", "six"], 0),
    ("Which is a fruit?", ["apple", "chair", "stone", "cloud"], 0),
    ("Pick a colour.", ["red", "seven"], 0),
    ("Water freezes at?", ["zero", "ninety"], 0),
]

MC_TASK = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{question}}\\nA:"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GEN_TASK = """\
task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files: gen.jsonl
test_split: train
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("eval") / "tuned", tiny_model_dir, seed=3)


@pytest.fixture
def mc_task(tmp_path):
    (tmp_path / "data").mkdir()
    rows = [{"question": q, "choices": c, "label": label} for q, c, label in QUESTIONS]
    (tmp_path / "data" / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tmp_path / "tasks" / "mc.yaml"
    task.parent.mkdir()
    task.write_text(MC_TASK.replace("data/mc.jsonl", "../data/mc.jsonl"))  # relative to the YAML, not the cwd
    return task


def summed_log_probs(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context), token by token, as a multiple-choice task scores each choice."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        log_probs = model(ids).logits.float().log_softmax(-1)[0]
    positions = range(len(context_ids) - 1, ids.shape[1] - 1)
    return sum(log_probs[p, t].item() for p, t in zip(positions, continuation_ids, strict=True))


def flat(rows):
    return [x for row in rows for x in row]


# A summed log-prob is the forward pass, then a log-softmax over the 259-token vocabulary, then the sum over the
# continuation's tokens: the harness's batched (padded) run and the one-row run here differ in summation order only.
LOG_PROB_SUMS = {"n_terms": 259, "sums_in_a_row": TINY_FORWARD["sums_in_a_row"] + 2}


def assert_same_log_probs(got, want):
    assert_close_reordered(torch.tensor(got), torch.tensor(want), **LOG_PROB_SUMS)  # float32, as computed


def clear_picks(rows) -> bool:
    """Whether every question's likeliest choice wins by more than two summation orders can move it."""
    bound = 2 * reordering_tolerance(**LOG_PROB_SUMS) * max(abs(x) for row in rows for x in row)
    return all(sorted(row)[-1] - sorted(row)[-2] > bound for row in rows)


def by_hand(tiny_model_dir, adapter):
    """Per question: each choice's summed log-prob, with the adapter (a folder) or the base alone (None)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [
        [summed_log_probs(model, tokenizer, f"Q: {q}\nA:", f" {c}") for c in choices] for q, choices, _ in QUESTIONS
    ]


def test_multiple_choice_accuracy_is_the_argmax_of_summed_log_probs(tiny_model_dir, adapter_dir, mc_task, tmp_path):
    out = tmp_path / "out"
    result = lpeft(
        "eval", "--model", tiny_model_dir, "--adapter", f"tuned={adapter_dir}", "--with-base",
        "--tasks", mc_task, "--output", out, "--log-samples",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "results.json").read_text())
    assert list(payload["models"]) == ["base", "tuned"]
    assert payload["models"]["tuned"]["adapter"] == str(adapter_dir) and payload["models"]["base"]["adapter"] is None
    scores = {}
    for label, adapter in (("base", None), ("tuned", adapter_dir)):
        expected = by_hand(tiny_model_dir, adapter)
        samples = [json.loads(line) for line in (out / "samples" / label / "tiny_mc.jsonl").read_text().splitlines()]
        samples.sort(key=lambda s: s["doc_id"])
        harness = [[resp[0][0] for resp in s["resps"]] for s in samples]  # each choice's (loglikelihood, greedy)
        assert [len(h) for h in harness] == [len(e) for e in expected]
        assert_same_log_probs(flat(harness), flat(expected))
        assert clear_picks(expected), "a near tie: the accuracy could flip with the summation order"
        picks = [max(range(len(lp)), key=lp.__getitem__) for lp in expected]  # the likeliest choice
        accuracy = sum(pick == label for pick, (_, _, label) in zip(picks, QUESTIONS, strict=True)) / len(QUESTIONS)
        scores[label] = payload["models"][label]["results"]["tiny_mc"]["acc,none"]
        assert scores[label] == pytest.approx(accuracy, abs=1e-12)
        [row] = payload["table"]
        assert row["values"][label]["value"] == scores[label] and row["metric"] == "acc"
    assert flat(by_hand(tiny_model_dir, None)) != pytest.approx(flat(by_hand(tiny_model_dir, adapter_dir)), abs=1e-3)
    # The table printed on stdout holds the same numbers, base first.
    header, line = result.stdout.strip().splitlines()
    assert header.split() == ["task", "metric", "base", "tuned"]
    stderr = payload["table"][0]["values"]["base"]["stderr"]
    assert line.split()[:5] == ["tiny_mc", "acc", "↑", f"{scores['base']:.4f}", "±"]
    assert f"{scores['base']:.4f} ± {stderr:.4f}" in line and f"{scores['tuned']:.4f} ± " in line


def test_generation_replies_are_greedy_decoding_and_exact_match_counts_them(tiny_model_dir, adapter_dir, tmp_path):
    from lightning_peft.serving import AdapterServer

    server = AdapterServer(str(tiny_model_dir))
    server.load("tuned", adapter_dir)
    prompts = ["Hello", "The cat", "1 2 3"]
    greedy = [r.split("\n")[0] for r in server.generate(prompts, "tuned", max_new_tokens=6)]
    # The first answer is what the adapter says, so exact match is 1/3 for it (unless the base says it too).
    rows = [{"prompt": p, "answer": greedy[0] if i == 0 else "never said"} for i, p in enumerate(prompts)]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "gen.yaml").write_text(GEN_TASK)
    out = tmp_path / "out"
    result = lpeft(
        "eval", "--model", tiny_model_dir, "--adapter", f"tuned={adapter_dir}",
        "--tasks", tmp_path / "gen.yaml", "--output", out, "--log-samples", "--batch-size", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    samples = [json.loads(line) for line in (out / "samples" / "tuned" / "tiny_gen.jsonl").read_text().splitlines()]
    replies = [s["resps"][0][0] for s in sorted(samples, key=lambda s: s["doc_id"])]
    assert replies == greedy
    payload = json.loads((out / "results.json").read_text())
    assert list(payload["models"]) == ["tuned"]  # no --with-base: the adapter alone
    assert payload["models"]["tuned"]["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(1 / 3)


def test_capitals_example_task_scores_with_the_shared_function(tiny_model_dir, tmp_path):
    """examples/tasks/capitals.yaml runs (chat template, 2 questions) and scores replies with capitals.judge."""
    import sys
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    sys.path.insert(0, str(examples / "tasks"))
    try:
        from capitals import judge
    finally:
        sys.path.remove(str(examples / "tasks"))
    assert judge('{"country": "Peru", "capital": "Lima"}', "Lima") == (True, True)
    assert judge('{"capital": "Cusco"}', "Lima") == (True, False)
    assert judge("The capital of Peru is Lima.", "Lima") == (False, True)
    assert judge('"Lima"', "Lima") == (False, True)
    out = tmp_path / "out"
    result = lpeft(
        "eval", "--model", tiny_model_dir, "--tasks", examples / "tasks" / "capitals.yaml", "--chat",
        "--limit", "2", "--output", out, "--log-samples",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    samples = [json.loads(line) for line in (out / "samples" / "base" / "capitals.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all("<|im_start|>user" in s["arguments"][0][0] for s in samples)
    valid = [judge(s["resps"][0][0], json.loads(s["target"])["capital"])[0] for s in samples]
    results = json.loads((out / "results.json").read_text())["models"]["base"]["results"]["capitals"]
    assert results["valid_json,none"] == pytest.approx(sum(valid) / 2)
    assert {"valid_json,none", "right_capital,none"} <= set(results)


def test_arc_easy_local_is_arcs_task_over_the_local_file(tiny_model_dir, tmp_path):
    """examples/tasks/arc_easy_local.yaml: ARC-Easy's prompt and choices over the shipped JSONL, scored by the harness."""
    examples = Path(__file__).parents[1] / "examples" / "tasks"
    docs = [json.loads(line) for line in (examples / "arc_easy_local" / "test.jsonl").read_text().splitlines()]
    assert len(docs) == 20 and all(d["answerKey"] in d["choices"]["label"] for d in docs)
    out = tmp_path / "out"
    result = lpeft("eval", "--model", tiny_model_dir, "--tasks", examples / "arc_easy_local.yaml", "--limit", "3",
                   "--output", out, "--log-samples")  # fmt: skip
    assert result.exit_code == 0, result.output
    samples = sorted(
        (json.loads(line) for line in (out / "samples" / "base" / "arc_easy_local.jsonl").read_text().splitlines()),
        key=lambda sample: sample["doc_id"],
    )
    picks = []
    for sample, doc in zip(samples, docs, strict=False):
        assert [a[0] for a in sample["arguments"]] == [f"Question: {doc['question']}\nAnswer:"] * 4
        assert [a[1] for a in sample["arguments"]] == [f" {text}" for text in doc["choices"]["text"]]
        log_probs = [resp[0][0] for resp in sample["resps"]]
        picks.append(max(range(4), key=log_probs.__getitem__) == doc["choices"]["label"].index(doc["answerKey"]))
    results = json.loads((out / "results.json").read_text())["models"]["base"]["results"]["arc_easy_local"]
    assert len(picks) == 3 and results["acc,none"] == pytest.approx(sum(picks) / 3)


def test_a_4bit_base_is_what_the_harness_scores(tiny_model_dir, mc_task, tmp_path):
    """`--quantization 4bit` loads as lpeft generate does, and the harness's log-likelihoods are that model's."""
    from lightning_peft.serving import AdapterServer

    out = tmp_path / "out"
    result = lpeft("eval", "--model", tiny_model_dir, "--tasks", mc_task, "--quantization", "4bit", "--output", out,
                   "--log-samples")  # fmt: skip
    assert result.exit_code == 0, result.output
    samples = [json.loads(line) for line in (out / "samples" / "base" / "tiny_mc.jsonl").read_text().splitlines()]
    harness = flat([[resp[0][0] for resp in s["resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])])
    server = AdapterServer(str(tiny_model_dir), quantization="4bit")
    quantized = flat(
        [
            [summed_log_probs(server.model, server.tokenizer, f"Q: {q}\nA:", f" {c}") for c in cs]
            for q, cs, _ in QUESTIONS
        ]
    )
    assert_same_log_probs(harness, quantized)
    with pytest.raises(AssertionError):  # not the float model's
        assert_same_log_probs(harness, flat(by_hand(tiny_model_dir, None)))


def test_a_registry_reference_scores_as_its_folder(adapter, tiny_model_dir, mc_task, tmp_path, monkeypatch):
    from lightning_peft.hub import publish

    monkeypatch.setenv("LPEFT_CACHE", str(tmp_path / "cache"))
    publish(adapter, "acme/caps", registry=tmp_path / "registry", verify=False)
    out = tmp_path / "out"
    result = lpeft(
        "eval", "--model", tiny_model_dir, "--adapter", "acme/caps@^1", "--adapter", f"local={adapter}",
        "--registry", tmp_path / "registry", "--tasks", mc_task, "--output", out, "--log-samples",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    models = json.loads((out / "results.json").read_text())["models"]
    assert list(models) == ["caps", "local"] and models["caps"]["adapter"] == "acme/caps@^1"
    resps = {
        label: [
            json.loads(line)["resps"] for line in (out / "samples" / label / "tiny_mc.jsonl").read_text().splitlines()
        ]
        for label in models
    }
    assert resps["caps"] == resps["local"]
    assert models["caps"]["results"] == models["local"]["results"]


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys; from lightning_peft.cli import main\n"
        "try: main(['eval', '--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--num-fewshot" in out and out.strip().endswith("False")


def test_chat_prompts_use_each_adapters_own_template(tiny_model_dir, tmp_path):
    """With --chat the base renders prompts with its tokenizer's template, an adapter with the one saved with it."""
    from transformers import AutoTokenizer

    folder = make_adapter(tmp_path / "styled", tiny_model_dir, seed=4)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}[[{{ m['content'] }}]]{% endfor %}{% if add_generation_prompt %}=>{% endif %}"
    )
    tokenizer.save_pretrained(folder)
    (tmp_path / "gen.jsonl").write_text(json.dumps({"prompt": "Hello", "answer": "x"}) + "\n")
    (tmp_path / "gen.yaml").write_text(GEN_TASK)
    out = tmp_path / "out"
    result = lpeft("eval", "--model", tiny_model_dir, "--adapter", folder, "--with-base", "--chat",
                   "--tasks", tmp_path / "gen.yaml", "--output", out, "--log-samples")  # fmt: skip
    assert result.exit_code == 0, result.output
    prompts = {
        label: json.loads((out / "samples" / label / "tiny_gen.jsonl").read_text())["arguments"][0][0]
        for label in ("base", "styled")
    }
    assert prompts["styled"] == "[[Hello]]=>"
    assert prompts["base"].startswith("<|im_start|>user\nHello<|im_end|>")


def test_limit_and_num_fewshot_reach_the_harness(tiny_model_dir, mc_task, tmp_path):
    out = tmp_path / "out"
    result = lpeft("eval", "--model", tiny_model_dir, "--tasks", mc_task, "--limit", "2", "--num-fewshot", "1",
                   "--output", out, "--log-samples")  # fmt: skip
    assert result.exit_code == 0, result.output
    base = json.loads((out / "results.json").read_text())["models"]["base"]
    assert base["n-samples"]["tiny_mc"] == {"original": 6, "effective": 2} and base["n-shot"]["tiny_mc"] == 1
    samples = [json.loads(line) for line in (out / "samples" / "base" / "tiny_mc.jsonl").read_text().splitlines()]
    assert all(s["arguments"][0][0].count("Q: ") == 2 for s in samples)  # one example, then the question


# ---- the table -------------------------------------------------------------------------------------------------


def test_table_rows_follow_the_harness_keys():
    runs = {
        "base": {
            "results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "em,strict": 1.0,
                              "em_stderr,strict": "N/A"}},
            "higher_is_better": {"t": {"acc": True, "em": True}},
        },
        "a": {"results": {"t": {"alias": "t", "acc,none": 0.75, "acc_stderr,none": 0.125}}, "higher_is_better": {}},
    }  # fmt: skip
    rows = metric_rows(runs)
    assert rows == [
        MetricRow("t", "acc", "none", True, {"base": (0.5, 0.1), "a": (0.75, 0.125)}),
        MetricRow("t", "em", "strict", True, {"base": (1.0, None)}),
    ]
    assert format_table(rows, ["base", "a"]).splitlines() == [
        "task  metric         base             a",
        "t     acc ↑          0.5000 ± 0.1000  0.7500 ± 0.1250",
        "t     em (strict) ↑  1.0000           —",
    ]


# ---- errors ----------------------------------------------------------------------------------------------------


def test_a_missing_task_file_fails_before_any_model_loads(tmp_path):
    result = lpeft("eval", "--model", tmp_path / "no-model", "--tasks", tmp_path / "nope.yaml")
    assert result.exit_code == 3
    assert error_line(result) == (
        f"lpeft: error: `--tasks` {tmp_path / 'nope.yaml'}: no such task file; give a harness task YAML or a task name."
    )


def test_a_missing_data_file_names_the_task_and_the_path(tmp_path):
    (tmp_path / "t.yaml").write_text(MC_TASK)
    result = lpeft("eval", "--model", tmp_path / "no-model", "--tasks", tmp_path / "t.yaml")
    assert result.exit_code == 3
    assert error_line(result).startswith(
        f"lpeft: error: `--tasks` {tmp_path / 't.yaml'}: dataset_kwargs.data_files 'data/mc.jsonl' is not a file"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dataset_path: json\n", "a task YAML needs a `task:` (or `group:`) key naming the task."),
        ("task: [unclosed\n", "not a readable task YAML"),
        (MC_TASK.replace("doc_to_target: label\n", "").replace("data/mc.jsonl", "d.jsonl"), "cannot build"),
    ],
)
def test_a_broken_task_file_is_a_usage_error(tmp_path, text, message):
    (tmp_path / "d.jsonl").write_text('{"question": "q", "choices": ["a"], "label": 0}\n')
    (tmp_path / "t.yaml").write_text(text)
    result = lpeft("eval", "--model", tmp_path / "no-model", "--tasks", tmp_path / "t.yaml")
    assert result.exit_code == 2, result.output
    assert message in error_line(result) and str(tmp_path / "t.yaml") in error_line(result)


def test_an_unknown_task_name_suggests_close_ones(monkeypatch):
    import lm_eval.tasks

    class Index:  # the harness's own index takes half a minute to build: its names are all this check reads
        def __init__(self, include_path=None, include_defaults=True):
            self.all_tasks = ["arc_easy", "hellaswag", "mmlu"] if include_defaults else []

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Index)
    with pytest.raises(ValueError, match=r"^`--tasks` 'hellaswg' is not a task .* did you mean hellaswag\?"):
        resolve_tasks(["hellaswg"])
    result = lpeft("eval", "--model", "x", "--tasks", "arc_easy,hellaswg")
    assert result.exit_code == 2 and "'hellaswg' is not a task lm-evaluation-harness knows" in error_line(result)


def test_an_adapter_for_another_base_is_refused(tiny_model_dir, mc_task, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.hidden_size = 64
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "wide")
    folder = make_adapter(tmp_path / "wide-adapter", tmp_path / "wide")
    result = lpeft("eval", "--model", tiny_model_dir, "--adapter", folder, "--tasks", mc_task)
    assert result.exit_code == 2
    assert error_line(result).startswith(f"lpeft: error: Adapter 'wide-adapter' ({folder}) does not fit this base")


def test_usage_errors(tmp_path, mc_task):
    result = lpeft("eval", "--model", "x", "--tasks", mc_task, "--log-samples")
    assert result.exit_code == 2 and "`--log-samples` writes into the --output folder" in error_line(result)
    result = lpeft("eval", "--model", "x", "--tasks", " , ")
    assert result.exit_code == 2 and "`--tasks` names no task" in error_line(result)
    assert lpeft("eval", "--model", "x").exit_code == 2  # click: --tasks is required


def test_help_lists_every_option():
    result = lpeft("eval", "--help")
    assert result.exit_code == 0
    for option in ("--model", "--adapter", "--with-base", "--tasks", "--limit", "--num-fewshot", "--batch-size",
                   "--output", "--chat", "--log-samples", "--quantization", "--registry", "--allow-base-mismatch"):  # fmt: skip
        assert option in result.output


def test_relative_data_files_are_read_from_the_task_folder(mc_task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "data")
    tasks = resolve_tasks([str(mc_task)])
    assert tasks.labels == [str(mc_task)] and tasks.include_path == [str(mc_task.parent)]
    assert tasks.specs[0]["dataset_kwargs"]["data_files"] == {"test": str(mc_task.parent.parent / "data/mc.jsonl")}
    assert not tasks.include_defaults


# ---- during training -------------------------------------------------------------------------------------------


def test_callback_logs_the_base_before_and_the_adapter_after_into_the_metric_history(tiny_model_dir, mc_task, tmp_path):
    from helpers import run_folder, write_run_config

    from lightning_peft.cli.lightning import run_lightning_cli

    callback = {"class_path": "lightning_peft.callbacks.LmEvalCallback", "init_args": {"tasks": [str(mc_task)]}}
    config = write_run_config(
        tmp_path, tiny_model_dir, model={"learning_rate": 0.05}, trainer={"callbacks": [callback]}
    )
    run_lightning_cli(["fit", "--config", str(config)])
    folder = run_folder(tmp_path / "runs")
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    logged = [(row["step"], row["lm_eval/tiny_mc/acc"]) for row in rows if "lm_eval/tiny_mc/acc" in row]
    assert [step for step, _ in logged] == [0, 2]
    for (_, accuracy), adapter in zip(logged, (None, folder / "adapter"), strict=True):
        picks = [max(range(len(lp)), key=lp.__getitem__) for lp in by_hand(tiny_model_dir, adapter)]
        assert accuracy == pytest.approx(sum(p == q[2] for p, q in zip(picks, QUESTIONS, strict=True)) / 6)
    assert flat(by_hand(tiny_model_dir, None)) != pytest.approx(flat(by_hand(tiny_model_dir, folder / "adapter")))
    # The pair, with the task's data set, for `lpeft publish`.
    [record] = json.loads((folder / "lm_eval.json").read_text())["tasks"]
    assert (record["task"], record["metric"], record["dataset"]) == ("tiny_mc", "acc", "json")
    assert (record["base"], record["adapter"]) == (logged[0][1], logged[1][1])


def test_callback_scores_at_each_validation_once_and_prints_the_pair(tiny_model_dir, mc_task, tmp_path, caplog):
    from helpers import run_folder, write_run_config

    from lightning_peft.cli.lightning import run_lightning_cli

    callback = {
        "class_path": "lightning_peft.callbacks.LmEvalCallback",
        "init_args": {"tasks": [str(mc_task)], "every_validation": True},
    }
    trainer = {"callbacks": [callback], "max_steps": 4, "val_check_interval": 2, "check_val_every_n_epoch": None}
    config = write_run_config(tmp_path, tiny_model_dir, model={"learning_rate": 0.05}, trainer=trainer)
    with caplog.at_level("INFO", logger="lightning_peft"):
        run_lightning_cli(["fit", "--config", str(config)])
    folder = run_folder(tmp_path / "runs")
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    logged = [(row["step"], row["lm_eval/tiny_mc/acc"]) for row in rows if "lm_eval/tiny_mc/acc" in row]
    # Before training, after each validation (steps 2 and 4), and not again at fit end (step 4 was scored).
    assert [step for step, _ in logged] == [0, 2, 4]
    [record] = json.loads((folder / "lm_eval.json").read_text())["tasks"]
    assert (record["base"], record["adapter"]) == (logged[0][1], logged[-1][1])
    [report] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lm-eval before and after")]
    assert re.search(rf"tiny_mc\s+acc ↑\s+{logged[0][1]:.4f} ± [0-9.]+\s+{logged[-1][1]:.4f}", report), report


def test_callback_checks_its_tasks_when_built(tmp_path):
    from lightning_peft.callbacks import LmEvalCallback

    with pytest.raises(FileNotFoundError, match=r"^`tasks` .*nope\.yaml: no such task file"):
        LmEvalCallback(tasks=[str(tmp_path / "nope.yaml")])
