"""Hub data sets with the real `datasets` client over HTTP against the fake Hub (hub_server.py).

`datasets` and huggingface_hub read HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, at import (and the suite runs
with HF_HUB_OFFLINE=1), so every run here is a fresh process with the environment a user would set.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_folder, write_run_config
from hub_server import FakeHub

REPO = "acme/chats"
ROOT = Path(__file__).resolve().parent.parent
README = b"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train.parquet
  - split: test
    path: data/test.parquet
- config_name: chat
  data_files:
  - split: train_sft
    path: chat/train_sft.parquet
  - split: test_sft
    path: chat/test_sft.parquet
---
# Chats, for tests
"""


def parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}


def repo_files(n_train: int = 6) -> dict[str, bytes]:
    """The default subset holds prompt/completion pairs, the `chat` subset (a folder) conversations; two splits each.

    One file type for the whole repo: `datasets` picks a single builder (here Parquet) for all of a repo's subsets.
    """
    pairs = [{"prompt": f"Q{i}: ", "completion": f"answer {i}"} for i in range(n_train + 2)]
    return {
        "README.md": README,
        "data/train.parquet": parquet(pairs[:n_train]),
        "data/test.parquet": parquet(pairs[n_train:]),
        "chat/train_sft.parquet": parquet([chat(i) for i in range(5)]),
        "chat/test_sft.parquet": parquet([chat(i) for i in range(5, 7)]),
    }


@pytest.fixture
def hub():
    server = FakeHub().start()
    server.add_dataset(REPO, repo_files())
    yield server
    server.stop()


def environment(hub: FakeHub, tmp_path: Path, offline: bool = False) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "LPEFT_"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_OFFLINE="1" if offline else "0",
        LPEFT_DATA_CACHE=str(tmp_path / "data-cache"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def write_config(tmp_path: Path, tiny_model_dir: Path, data: dict) -> Path:
    # No local train file: every data setting comes from `data` (Hub ids, mixtures).
    data = {"train_file": None, "val_fraction": None, **data}
    return write_run_config(tmp_path, tiny_model_dir, data=data)


def lpeft(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_peft", *args], capture_output=True, text=True, env=env)


def downloads(hub: FakeHub) -> list[str]:
    return [path for method, path in hub.requests if method == "GET" and f"/datasets/{REPO}/resolve/" in path]


def test_fit_on_a_hub_data_set_then_again_offline_from_the_cache(hub, tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, {"val_fraction": 0.34})
    online = lpeft(environment(hub, tmp_path), "fit", "--config", str(config), "--data.train_file", REPO)
    assert online.returncode == 0, online.stderr
    assert (run_folder(tmp_path / "runs") / "adapter" / "adapter_model.safetensors").is_file()
    # The card (it declares the subsets) and the default subset's files (`datasets` prepares every split of a
    # subset); not the `chat` subset.
    assert {p.rpartition("/")[2] for p in downloads(hub)} == {"README.md", "train.parquet", "test.parquet"}
    assert f"train: 3 examples from {REPO} (split train) (format prompt_completion)" in online.stderr

    seen = len(hub.requests)
    offline = lpeft(environment(hub, tmp_path, offline=True), "fit", "--config", str(config), "--data.train_file", REPO)
    assert offline.returncode == 0, offline.stderr
    assert len(hub.requests) == seen  # not one request: the data comes from the `datasets` cache
    assert "tokenized by an earlier run" in offline.stderr


def test_a_mixture_of_hub_subsets_and_splits_with_their_own_formats(hub, tmp_path, tiny_model_dir):
    """A structured source (subset, split, revision), a hf:// URL, and a count and a weight, in one fit."""
    commit = hub.datasets[REPO].branches["main"]
    mixture = [
        {"path": REPO, "name": "chat", "split": "train_sft", "revision": commit, "format": "messages", "count": 8},
        {"path": f"hf://datasets/{REPO}@main", "split": "test", "weight": 2.0},
    ]
    config = write_config(tmp_path, tiny_model_dir, {"train_datasets": mixture})
    result = lpeft(environment(hub, tmp_path), "fit", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert f"{REPO} (subset chat, split train_sft, revision {commit}): 8" in result.stderr
    assert f"{REPO} (split test, revision main): 4" in result.stderr
    assert "train: 12 examples from the mixture of 2 data sets" in result.stderr
    assert {p.rpartition("/")[2] for p in downloads(hub)} >= {"train_sft.parquet", "test.parquet"}


def test_the_published_card_declares_the_hub_data_and_its_metrics(hub, tmp_path, tiny_model_dir):
    """The run records which sources were Hub data sets; the card declares those (with subset, split, revision)
    and puts the validation metrics measured on one into its model-index. The local file is named, not declared."""
    mixture = [
        {"path": REPO, "name": "chat", "split": "train_sft", "format": "messages"},
        str(tmp_path / "train.jsonl"),
    ]
    data = {"train_datasets": mixture, "val_file": {"path": REPO, "split": "test"}}
    config = write_config(tmp_path, tiny_model_dir, data)
    fit = lpeft(environment(hub, tmp_path), "fit", "--config", str(config), "--trainer.val_check_interval", "2")
    assert fit.returncode == 0, fit.stderr
    run = run_folder(tmp_path / "runs")
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["data"] == [
        {"role": "train", "hub": True, "id": REPO, "subset": "chat", "split": "train_sft", "revision": None},
        {"role": "train", "hub": False, "name": "train.jsonl"},
        {"role": "validation", "hub": True, "id": REPO, "subset": None, "split": "test", "revision": None},
    ]
    registry = tmp_path / "registry"
    published = lpeft(environment(hub, tmp_path), "publish", str(run / "adapter"), "acme/mixed", "--registry",
                      str(registry), "--no-verify")  # fmt: skip
    assert published.returncode == 0, published.stderr
    from huggingface_hub import ModelCard

    card = ModelCard.load(next(registry.rglob("README.md")))
    assert card.data.datasets == [REPO]
    results = {(r.dataset_type, r.dataset_config, r.dataset_split, r.metric_type) for r in card.data.eval_results}
    assert results == {(REPO, None, "test", kind) for kind in ("loss", "perplexity", "accuracy")}
    assert "train: `train.jsonl` (a local file)" in card.text and f"train: [{REPO}]" in card.text
    assert "subset `chat`, split `train_sft`" in card.text


def test_unknown_ids_and_splits_are_one_line_errors(hub, tmp_path, tiny_model_dir):
    config = str(write_config(tmp_path, tiny_model_dir, {}))
    env = environment(hub, tmp_path)
    cases = [
        (
            env,
            ["--data.train_file", "acme/nothing"],
            "lpeft: error: `data.train_file`='acme/nothing': no local file or folder",
        ),
        (env, ["--data.train_file", json.dumps({"path": REPO, "split": "dev"})], 'Unknown split "dev"'),
        (
            environment(hub, tmp_path, offline=True),
            ["--data.train_file", "acme/nothing"],
            "HF_HUB_OFFLINE=1 and the `datasets` cache cannot provide the Hub data set acme/nothing (split train)",
        ),
    ]
    for env, override, message in cases:
        result = lpeft(env, "fit", "--config", config, *override)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 3, result.stderr
        assert message in lines[-1] and "Traceback" not in result.stderr
        assert "check the path or the id" in lines[-1] or "set `split`" in lines[-1] or "unset HF_HUB" in lines[-1]
    assert not list((tmp_path / "runs").glob("**/adapter")), "nothing was trained or saved"


DATAMODULE = """
import json, sys
from lightning_peft.data import SFTDataModule
from lightning_peft.models import load_tokenizer
dm = SFTDataModule(**json.loads(sys.argv[1]), tokenizer=load_tokenizer(sys.argv[2]), max_length=64)
dm.setup(sys.argv[3])
if sys.argv[3] == "predict":
    references = [dm.predict_dataset[i]["reference"] for i in range(len(dm.predict_dataset))]
    print(json.dumps({"references": sorted(references), **dm.stats["predict"]}))
else:
    print(json.dumps({"from_cache": dm.train_dataset.data.from_cache, **dm.stats["train"]}))
"""


def setup_in_a_process(env: dict[str, str], tiny_model_dir: Path, stage: str = "fit", **kwargs) -> dict:
    code = [sys.executable, "-c", DATAMODULE, json.dumps(kwargs), str(tiny_model_dir), stage]
    result = subprocess.run(code, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_new_commit_of_the_data_set_is_tokenized_again(hub, tmp_path, tiny_model_dir):
    env = environment(hub, tmp_path)
    first = setup_in_a_process(env, tiny_model_dir, train_file=REPO)
    again = setup_in_a_process(env, tiny_model_dir, train_file=REPO)
    assert (first["from_cache"], again["from_cache"], again["examples"]) == (False, True, 6)
    hub.add_dataset(REPO, repo_files(n_train=9), title="more data")
    changed = setup_in_a_process(env, tiny_model_dir, train_file=REPO)
    assert (changed["from_cache"], changed["examples"]) == (False, 9)
    # Another split of the same commit is other data, with its own cache entry.
    other = setup_in_a_process(env, tiny_model_dir, train_file={"path": REPO, "name": "chat", "split": "test_sft"})
    assert (other["from_cache"], other["examples"]) == (False, 2)


def test_prompts_to_predict_from_a_hub_split(hub, tmp_path, tiny_model_dir):
    stats = setup_in_a_process(environment(hub, tmp_path), tiny_model_dir, "predict", predict_file=REPO)
    assert stats["prompts"] == 2 and stats["references"] == ["answer 6", "answer 7"]  # the default subset's test split
