"""`lpeft list | search` on both registries (a local folder; the FakeHub over HTTP, through `HfApi.list_models`)."""

from __future__ import annotations

import json
import shutil

import pytest
from hub_server import Commit, lpeft, make_adapter
from tiny import save_tiny_model

from lightning_peft.hub import list_adapters, search, yank


def ia3_adapter(folder, base_dir):
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Adapters on the tiny base, on other weights saved under the same id, and an IA3 one for another base."""
    root = tmp_path_factory.mktemp("adapters")
    other_weights = save_tiny_model(root / "other-weights", seed=1)
    return {
        "capitals": make_adapter(root / "capitals", tiny_model_dir),
        "retrained": make_adapter(root / "retrained", other_weights, seed=1),
        "ia3": ia3_adapter(root / "ia3", tiny_model_dir),
    }


@pytest.fixture(params=["local", "hf"])
def registry(request, tmp_path, adapters):
    """A registry holding acme/capitals 1.0.0 and 1.1.0 (yanked), acme/retrained and acme/ia3."""
    value = request.getfixturevalue("hub").url if request.param == "hf" else str(tmp_path / "registry")
    published = [
        ("capitals", "acme/capitals", "acme-labs/tiny", ["--license", "mit", "-m", "capital cities"]),
        ("capitals", "acme/capitals", "acme-labs/tiny", ["--version", "1.1.0", "-m", "broken"]),
        ("retrained", "acme/retrained", "acme-labs/tiny", ["--license", "mit"]),
        ("ia3", "acme/ia3", "other-labs/tiny", ["--license", "apache-2.0"]),
    ]
    for adapter, repo, base_id, args in published:
        result = lpeft("publish", adapters[adapter], repo, "--registry", value, "--base-model-id", base_id,
                       "--no-verify", *args)  # fmt: skip
        assert result.exit_code == 0, result.output
    yank("acme/capitals@1.1.0", "broken tokenizer", registry=value)
    return value


def test_list_shows_every_repo_with_its_latest_version_not_yanked(registry):
    found = {s.repo_id: s for s in list_adapters(registry=registry)}
    assert sorted(found) == ["acme/capitals", "acme/ia3", "acme/retrained"]
    assert found["acme/capitals"].version == "1.0.0" and found["acme/capitals"].yanked == {"1.1.0": "broken tokenizer"}
    assert (found["acme/ia3"].method, found["acme/ia3"].base_model) == ("IA3", "other-labs/tiny")
    assert found["acme/capitals"].size > 0 and found["acme/capitals"].license == "mit"

    result = lpeft("list", "--registry", registry)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["REPO", "VERSION", "BASE", "METHOD", "SIZE", "LICENSE", "SCORES"]
    assert lines[1].split()[:4] == ["acme/capitals", "1.0.0", "acme-labs/tiny", "LORA"]
    assert lines[-1] == "acme/capitals 1.1.0 is yanked: broken tokenizer"

    listed = json.loads(lpeft("list", "--registry", registry, "--json").stdout)
    assert [(e["repo_id"], e["version"]) for e in listed] == [
        ("acme/capitals", "1.0.0"),
        ("acme/ia3", "1.0.0"),
        ("acme/retrained", "1.0.0"),
    ]


@pytest.mark.parametrize(
    ("text", "filters", "expected"),
    [
        ("capital", {}, ["acme/capitals"]),
        (None, {"method": "ia3"}, ["acme/ia3"]),
        (None, {"license": "MIT"}, ["acme/capitals", "acme/retrained"]),
        (None, {"tag": "lora"}, ["acme/capitals", "acme/retrained"]),
        (None, {"base": "other-labs/tiny"}, ["acme/ia3"]),  # a Hub id not on this machine: ids only
        ("nothing-like-this", {}, []),
    ],
)
def test_search_filters(registry, text, filters, expected):
    assert [s.repo_id for s in search(text, registry=registry, **filters)] == expected


def test_search_by_a_local_base_marks_other_weights_of_the_same_id(registry, tiny_model_dir, tmp_path):
    # The base as the Hub cache holds it: its Hub id is known, and its weights are on this machine.
    cached = tmp_path / "hub" / "models--acme-labs--tiny" / "snapshots" / "0123abc"
    shutil.copytree(tiny_model_dir, cached)
    found = {s.repo_id: s.base_matches for s in search(base=str(cached), registry=registry)}
    assert found == {"acme/capitals": True, "acme/retrained": False}

    result = lpeft("search", "--base", cached, "--registry", registry)
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[-1] for line in result.stdout.splitlines()[1:3]}
    assert rows == {"acme/capitals": "same", "acme/retrained": "DIFFERENT"}

    # A folder of unknown origin: only the adapters trained on exactly these weights.
    assert [s.repo_id for s in search(base=str(tiny_model_dir), registry=registry)] == ["acme/capitals", "acme/ia3"]


def test_hub_search_asks_list_models_for_the_base_and_skips_repos_without_a_manifest(hub, adapters):
    assert lpeft("publish", adapters["ia3"], "acme/ia3", "--registry", hub.url, "--base-model-id", "other-labs/tiny",
                 "--no-verify").exit_code == 0  # fmt: skip
    # A tagged repo whose card carries the tags but which has no manifest: not a package, so not listed.
    hub.create_repo({"name": "someone/plain-peft"})
    card = b"---\nlibrary_name: peft\ntags: [lightning-peft]\nbase_model: other-labs/tiny\nbase_model_relation: adapter\n---\n"
    plain = hub.repos["someone/plain-peft"]
    plain.commits.append(Commit("f" * 40, "card", "", {"README.md": card, "adapter_config.json": b"{}"}))
    plain.branches["main"] = plain.tags["v1.0.0"] = "f" * 40
    assert [s.repo_id for s in search(base="other-labs/tiny", registry=hub.url)] == ["acme/ia3"]
    assert hub.model_filters == [["peft", "lightning-peft", "base_model:adapter:other-labs/tiny"]]
    assert [s.repo_id for s in list_adapters(registry=hub.url)] == ["acme/ia3"]


def test_search_shows_the_harness_scores_the_run_recorded(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    score = {"task": "capitals", "metric": "right_capital", "filter": "none", "higher_is_better": True,
             "base": 0.7083, "adapter": 0.75, "dataset": "json", "dataset_config": None, "split": "validation"}  # fmt: skip
    (run / "lm_eval.json").write_text(json.dumps({"tasks": [score]}))
    registry = str(tmp_path / "registry")
    adapter = make_adapter(run / "adapter", tiny_model_dir)
    result = lpeft("publish", adapter, "acme/scored", "--registry", registry, "--base-model-id", "acme-labs/tiny",
                   "--no-verify")  # fmt: skip
    assert result.exit_code == 0, result.output

    [found] = search("scored", registry=registry)
    assert [(s.task, s.metric, s.base, s.adapter) for s in found.scores] == [
        ("capitals", "right_capital", 0.7083, 0.75)
    ]
    table = lpeft("search", "scored", "--registry", registry).stdout.splitlines()
    assert table[1].endswith("capitals/right_capital 0.708 → 0.750"), table
    [listed] = json.loads(lpeft("list", "--registry", registry, "--json").stdout)
    assert listed["scores"] == [score]
