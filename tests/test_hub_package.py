"""Packaging an adapter offline: the manifest, the model card, the base fingerprint, determinism, the lint
and the logits check."""

from __future__ import annotations

import json
import shutil

import pytest
from hub_server import make_adapter, pickle_only_adapter, write_run_files
from huggingface_hub import ModelCard

from lightning_peft.errors import ConfigError, DataError
from lightning_peft.hub import PackageSpec, fingerprint, package_adapter
from lightning_peft.hub.lint import lint_adapter_config
from lightning_peft.hub.manifest import MANIFEST_FILE, Manifest, check_relative_path, parse, read
from lightning_peft.hub.package import read_source
from lightning_peft.hub.verify import check_base, compare_logits

BASE_ID = "acme-labs/tiny-llama"


@pytest.fixture(scope="module")
def run_adapter(tiny_model_dir, tmp_path_factory):
    """`<run>/adapter` as `lpeft fit` leaves it, with the run's metrics.csv and hparams.yaml beside it."""
    run = tmp_path_factory.mktemp("run")
    write_run_files(run)
    return make_adapter(run / "adapter", tiny_model_dir)


@pytest.fixture(scope="module")
def package(run_adapter, tmp_path_factory):
    spec = PackageSpec(
        name="acme/capitals",
        version="1.2.0",
        parent_version="1.1.0",
        history=["1.1.0", "1.0.0"],
        message="more data",
        license="apache-2.0",
        datasets=["acme/capitals-qa"],
        base_model_id=BASE_ID,
    )
    return package_adapter(run_adapter, tmp_path_factory.mktemp("pkg") / "out", spec)


def test_package_files_and_manifest(package, tiny_model_dir):
    files = sorted(p.name for p in package.path.iterdir())
    assert files == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "loss_curve.png", MANIFEST_FILE]
    )
    manifest = json.loads((package.path / MANIFEST_FILE).read_text())
    assert manifest["name"] == "acme/capitals" and manifest["version"] == "1.2.0"
    assert manifest["parent_version"] == "1.1.0" and manifest["history"] == ["1.1.0", "1.0.0"]
    assert manifest["base_model"] == {
        "id": BASE_ID,
        "revision": None,
        "fingerprint": fingerprint(tiny_model_dir),
        "fingerprint_method": "lpeft-base-v1",
        "weights": None,  # the folder's own files (a built-in alias would say which build it loads)
        "alias": None,
    }
    adapter = manifest["adapter"]
    assert adapter["method"] == "LORA" and adapter["hyperparameters"]["r"] == 2 and adapter["parameters"] > 0
    summary = manifest["training"]["summary"]
    assert summary["steps"] == 20 and summary["final_train_loss"] == 0.875 and summary["final_val_loss"] == 1.5
    assert summary["tokens"] is None and summary["hardware"] is None  # not logged, so not guessed
    assert manifest["training"]["hyperparameters"]["learning_rate"] == 0.0002
    assert manifest["evaluation"] == {"val_acc": 0.625, "val_loss": 1.5, "val_ppl": 4.48169}
    assert manifest["datasets"] == {
        "hub": ["acme/capitals-qa"],
        "files": {"train": "train.jsonl", "validation": "val.jsonl"},
        "hub_sources": [],  # no run_summary.json: the YAML settings give local file names only
    }
    assert {"peft", "huggingface-hub", "lightning-peft"} <= set(manifest["libraries"])
    assert manifest["license"] == "apache-2.0" and manifest["message"] == "more data"
    listed = {f["path"] for f in manifest["files"]}
    assert listed == set(files) - {MANIFEST_FILE}
    parse((package.path / MANIFEST_FILE).read_bytes(), where="test")  # what pull checks


def test_adapter_config_names_the_base_by_hub_id(package, run_adapter):
    packaged = json.loads((package.path / "adapter_config.json").read_text())
    source = json.loads((run_adapter / "adapter_config.json").read_text())
    assert packaged["base_model_name_or_path"] == BASE_ID
    assert {k: v for k, v in packaged.items() if k != "base_model_name_or_path"} == {
        k: v for k, v in source.items() if k != "base_model_name_or_path"
    }
    assert (package.path / "adapter_model.safetensors").read_bytes() == (
        run_adapter / "adapter_model.safetensors"
    ).read_bytes()


def test_model_card_round_trips_with_the_metadata(package):
    text = (package.path / "README.md").read_text()
    card = ModelCard.load(package.path / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == BASE_ID and data["base_model_relation"] == "adapter"
    assert data["library_name"] == "peft" and data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0" and data["datasets"] == ["acme/capitals-qa"]
    assert "lightning-peft" in data["tags"]
    # The metrics were measured on a local file, which is not a Hub data set id: no model-index, the body has them.
    assert card.data.eval_results is None and "model-index" not in data
    assert "Last logged values, on validation: `val.jsonl`:" in text and "| val_ppl | 4.482 |" in text
    assert (
        "Data: train: `train.jsonl` (a local file); validation: `val.jsonl` (a local file); [acme/capitals-qa]" in text
    )
    assert str(ModelCard(str(card))) == str(card)
    for section in ("## How to use", "## Training", "## Evaluation", "## Version history", "## Files", "vllm serve"):
        assert section in text
    assert "![Training and validation loss](loss_curve.png)" in text
    assert "- **1.2.0** (this version): more data\n- 1.1.0\n- 1.0.0" in text
    sha = json.loads((package.path / MANIFEST_FILE).read_text())["files"]
    assert next(f["sha256"] for f in sha if f["path"] == "adapter_model.safetensors") in text
    assert "More Information Needed" not in text  # PEFT's placeholder card in the source folder is not used


def test_loss_curve_is_a_png(package):
    assert (package.path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_run_files_or_hub_id_the_card_says_so(tiny_model_dir, tmp_path, caplog):
    adapter = make_adapter(tmp_path / "adapter", tiny_model_dir)
    with caplog.at_level("WARNING", logger="lightning_peft.hub.package"):
        result = package_adapter(adapter, tmp_path / "pkg", PackageSpec(name="acme/bare", version="1.0.0"))
    assert "local folder with no known Hub id" in caplog.text and "--base-model-id" in caplog.text
    text = (result.path / "README.md").read_text()
    data = ModelCard.load(result.path / "README.md").data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data and "model-index" not in data
    assert "no known Hub id" in text and "No loss values were logged" in text
    assert "No evaluation metrics were logged" in text and "More Information Needed" not in text
    assert not (result.path / "loss_curve.png").exists()
    assert json.loads((result.path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model_dir
    )


def test_packaging_is_deterministic(run_adapter, tmp_path, monkeypatch):
    spec = PackageSpec(name="acme/capitals", version="1.0.0", base_model_id=BASE_ID)
    first = package_adapter(run_adapter, tmp_path / "a", spec).path
    second = package_adapter(run_adapter, tmp_path / "b", spec).path
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        if name != MANIFEST_FILE:
            assert (first / name).read_bytes() == (second / name).read_bytes(), name
    manifests = [json.loads((d / MANIFEST_FILE).read_text()) for d in (first, second)]
    for manifest in manifests:
        manifest.pop("created_at")
    assert manifests[0] == manifests[1]
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    third = package_adapter(run_adapter, tmp_path / "c", spec).path
    fourth = package_adapter(run_adapter, tmp_path / "d", spec).path
    assert (third / MANIFEST_FILE).read_bytes() == (fourth / MANIFEST_FILE).read_bytes()
    assert json.loads((third / MANIFEST_FILE).read_text())["created_at"] == "2023-11-14T22:13:20Z"


def test_fingerprint_ignores_sharding_and_resaving_but_not_weights(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    config = json.loads((tmp_path / "sharded" / "config.json").read_text())
    config["transformers_version"] = "0.0.1"
    (tmp_path / "sharded" / "config.json").write_text(json.dumps(config))
    assert fingerprint(tmp_path / "sharded") == fingerprint(tiny_model_dir)
    with __import__("torch").no_grad():
        model.lm_head.weight[0, 0] += 1e-3
    model.save_pretrained(tmp_path / "changed")
    assert fingerprint(tmp_path / "changed") != fingerprint(tiny_model_dir)


def test_fingerprints_are_cached_until_a_weight_file_changes(tiny_model_dir, tmp_path, monkeypatch, caplog):
    import importlib
    import shutil

    fingerprint_lib = importlib.import_module("lightning_peft.hub.fingerprint")  # the package exports a function

    monkeypatch.setenv("LPEFT_CACHE", str(tmp_path / "cache"))
    shutil.copytree(tiny_model_dir, tmp_path / "base")
    computed = []
    real = fingerprint_lib._compute
    monkeypatch.setattr(fingerprint_lib, "_compute", lambda *args: computed.append(1) or real(*args))
    monkeypatch.setattr(fingerprint_lib, "_ANNOUNCE_BYTES", 1)
    with caplog.at_level("INFO", logger="lightning_peft.hub.fingerprint"):
        first = fingerprint(tmp_path / "base")
    assert "Fingerprinting the base model in" in caplog.text  # long hashing says so (a tqdm bar on a terminal)
    assert fingerprint(tmp_path / "base") == first and len(computed) == 1  # the second answer is the cached one
    assert len(list((tmp_path / "cache" / "fingerprints").iterdir())) == 1

    weights = next((tmp_path / "base").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, same path: only the content (and so the mtime) changes
    weights.write_bytes(bytes(data))
    assert fingerprint(tmp_path / "base") != first and len(computed) == 2


def test_fingerprint_needs_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="has no \\*.safetensors weights"):
        fingerprint(tmp_path)


def test_not_an_adapter_folder(tmp_path):
    with pytest.raises(ConfigError, match="is not a folder"):
        read_source(tmp_path / "missing")
    with pytest.raises(ConfigError, match="is not a PEFT adapter folder: adapter_config.json is missing"):
        read_source(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"r": 2}')
    with pytest.raises(ConfigError, match="has no `peft_type`"):
        read_source(tmp_path)


def test_pickle_weights_are_refused_and_never_unpickled(run_adapter, tmp_path):
    marker = tmp_path / "unpickled"
    folder = pickle_only_adapter(run_adapter, tmp_path / "bin", marker)
    with pytest.raises(ConfigError, match=r"only pickle weights \(adapter_model.bin\).*--allow-pickle"):
        package_adapter(folder, tmp_path / "pkg", PackageSpec(name="acme/x", version="1.0.0"))
    assert not (tmp_path / "pkg").exists()
    result = package_adapter(folder, tmp_path / "pkg", PackageSpec(name="acme/x", version="1.0.0", allow_pickle=True))
    assert (result.path / "adapter_model.bin").read_bytes() == (folder / "adapter_model.bin").read_bytes()
    assert result.manifest.adapter.parameters is None
    assert not marker.exists()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "acme", "must be 'org/name'"),
        ("name", "acme/bad name", "is not a valid repo id"),
        ("license", "Apache 2.0", "is not a Hub license id"),
        ("datasets", ["../data"], "`--dataset`='../data' is not a valid repo id"),
        ("base_model_id", "/models/tiny", "`--base-model-id`='/models/tiny' is not a valid repo id"),
    ],
)
def test_bad_package_options(run_adapter, tmp_path, field, value, message):
    spec = PackageSpec(**{"name": "acme/x", "version": "1.0.0", field: value})
    with pytest.raises(ConfigError, match=message):
        package_adapter(run_adapter, tmp_path / "pkg", spec)
    assert not (tmp_path / "pkg").exists()


def test_missing_base_is_a_clear_error(run_adapter, tmp_path):
    with pytest.raises(ConfigError, match="is not an existing folder"):
        package_adapter(run_adapter, tmp_path / "pkg", PackageSpec(name="acme/x", version="1.0.0", base="./nowhere"))


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../b", "./a", "a//b", "C:/x", "a\\b", ""])
def test_manifest_paths_must_stay_inside(path):
    with pytest.raises(DataError, match="file path"):
        check_relative_path(path, where="test")


def test_manifest_parse_rejects_escaping_and_bad_entries(package):
    manifest = json.loads((package.path / MANIFEST_FILE).read_text())
    for bad, message in [
        ({"path": "../evil", "sha256": "0" * 64, "size": 1}, "escapes the package folder"),
        ({"path": "/abs", "sha256": "0" * 64, "size": 1}, "escapes the package folder"),
        ({"path": "x", "sha256": "nope", "size": 1}, "no valid sha256"),
        ({"path": MANIFEST_FILE, "sha256": "0" * 64, "size": 1}, "must not list itself"),
    ]:
        broken = {**manifest, "files": [*manifest["files"], bad]}
        with pytest.raises(DataError, match=message):
            parse(json.dumps(broken).encode(), where="test")
    with pytest.raises(DataError, match=r"test: lpeft_manifest.json is damaged \(invalid JSON: .*\): publish this"):
        parse(b"{", where="test")
    with pytest.raises(DataError, match="lacks base_model, files"):
        parse(b'{"format": 1, "format_version": 1, "name": "a/b", "version": "1.0.0"}', where="test")


def test_manifest_round_trip(package):
    raw = (package.path / MANIFEST_FILE).read_bytes()
    manifest = read(package.path)
    assert manifest == package.manifest and manifest.to_bytes() == raw
    assert Manifest.from_dict(json.loads(raw), where="test") == manifest
    assert manifest.base_model.id == BASE_ID and manifest.files[0].path == "README.md"
    assert manifest.format_version == 1 and set(json.loads(raw)) == set(manifest.to_dict())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["adapter"].pop("method"), r"has no `adapter.method`"),
        (lambda m: m.pop("serving"), r"has no `serving`"),
        (
            lambda m: m["serving"].update(vllm_compatible="yes"),
            r"`serving.vllm_compatible` must be true or false, not 'yes'",
        ),
        (lambda m: m["base_model"].update(fingerprint=None), r"`base_model.fingerprint` must be a string, not None"),
        (lambda m: m["datasets"].update(hub="acme/x"), r"`datasets.hub` must be a list, not 'acme/x'"),
        (lambda m: m["training"].update(sources=[1]), r"`training.sources\[0\]` must be a string, not 1"),
        (lambda m: m["evaluation"].update(val_loss="low"), r"`evaluation.val_loss` must be a number, not 'low'"),
        (lambda m: m.update(adapter=[]), r"`adapter` must be an object, not \[\]"),
    ],
)
def test_manifest_fields_are_checked_one_line_naming_the_field(package, change, message):
    data = json.loads((package.path / MANIFEST_FILE).read_text())
    change(data)
    with pytest.raises(DataError, match=f"^acme/capitals 1.2.0: lpeft_manifest.json (field )?{message}") as caught:
        parse(json.dumps(data).encode(), where="acme/capitals 1.2.0")
    assert "\n" not in str(caught.value)


def test_manifest_fields_added_after_v1_may_be_absent(package):
    data = json.loads((package.path / MANIFEST_FILE).read_text())
    for key in ("weights", "alias"):  # packages made before built-in alias bases were recorded
        del data["base_model"][key]
    manifest = parse(json.dumps(data).encode(), where="test")
    assert manifest.base_model.alias is None and manifest.base_model.weights is None


def test_serving_lint():
    assert lint_adapter_config({"peft_type": "LORA", "r": 8}).vllm_compatible
    report = lint_adapter_config({"peft_type": "LORA", "r": 64, "modules_to_save": ["lm_head"], "use_dora": True})
    assert [p.split()[0] for p in report.problems] == ["`modules_to_save`=['lm_head']", "DoRA"]
    assert report.notes == ["Rank 64 needs `--max-lora-rank 64` in vLLM (its default is 16)."]
    assert "serves LoRA adapters only, and this is IA3" in lint_adapter_config({"peft_type": "IA3"}).problems[0]
    assert "biases" in lint_adapter_config({"peft_type": "LORA", "r": 8, "bias": "all"}).problems[0]


def test_logits_check_passes_for_the_package_and_catches_a_different_adapter(
    package, run_adapter, tiny_model_dir, tmp_path
):
    assert compare_logits(run_adapter, package.path, tiny_model_dir) == 0.0
    other = make_adapter(tmp_path / "other", tiny_model_dir, seed=1)
    with pytest.raises(ConfigError, match="logits differ from the source adapter's"):
        compare_logits(run_adapter, other, tiny_model_dir)


def test_base_check(package, tiny_model_dir, tmp_path):
    from tiny import save_tiny_model

    other = save_tiny_model(tmp_path / "other-base", seed=1)
    assert check_base(package.path, str(tiny_model_dir))
    with pytest.raises(ConfigError, match="is not the one this adapter was trained on .*pass --allow-base-mismatch"):
        check_base(package.path, str(other))
    with pytest.warns(UserWarning, match="used anyway because of --allow-base-mismatch"):
        assert check_base(package.path, str(other), force=True) is False


def test_run_summary_and_missing_matplotlib(run_adapter, tmp_path, monkeypatch):
    import lightning_peft.hub.package as package_module

    run = tmp_path / "run"
    shutil.copytree(run_adapter.parent, run)
    summary = {"steps": 20, "tokens": 40960, "duration_s": 61.5, "hardware": "2 CPU cores"}
    (run / "run_summary.json").write_text(json.dumps(summary))
    monkeypatch.setattr(package_module, "can_plot", lambda: False)
    result = package_adapter(run / "adapter", tmp_path / "pkg", PackageSpec(name="acme/x", version="1.0.0"))
    assert {k: result.manifest.training.summary[k] for k in summary} == summary
    text = (result.path / "README.md").read_text()
    assert "| Tokens | 40960 |" in text and "| Duration | 62 s |" in text and "| Hardware | 2 CPU cores |" in text
    assert "The loss curve was not drawn (matplotlib was not installed" in text
    assert not (result.path / "loss_curve.png").exists()


LM_EVAL = {
    "tasks": [
        {"task": "arc_easy", "metric": "acc", "filter": "none", "higher_is_better": True, "base": 0.25,
         "adapter": 0.5, "dataset": "allenai/ai2_arc", "dataset_config": "ARC-Easy", "split": "test"},
        {"task": "capitals", "metric": "right_capital", "filter": "none", "higher_is_better": True, "base": 0.7083,
         "adapter": 0.4583, "dataset": "json", "dataset_config": None, "split": "validation"},
    ]
}  # fmt: skip


def test_harness_scores_of_the_run_reach_the_manifest_and_the_card(tiny_model_dir, tmp_path):
    """LmEvalCallback's lm_eval.json: both scores in the body; the model-index gets the Hub data set's task only."""
    run = tmp_path / "run"
    run.mkdir()
    write_run_files(run)
    (run / "lm_eval.json").write_text(json.dumps(LM_EVAL))
    adapter = make_adapter(run / "adapter", tiny_model_dir)
    spec = PackageSpec(name="acme/evaluated", version="1.0.0", base_model_id=BASE_ID)
    package = package_adapter(adapter, tmp_path / "pkg", spec)
    manifest = json.loads((package.path / MANIFEST_FILE).read_text())
    assert manifest["harness"] == LM_EVAL["tasks"]
    card = ModelCard.load(package.path / "README.md")
    harness = [r for r in card.data.eval_results if r.task_name]
    assert [(r.task_name, r.dataset_type, r.dataset_config, r.dataset_split, r.metric_type, r.metric_value)
            for r in harness] == [("arc_easy", "allenai/ai2_arc", "ARC-Easy", "test", "accuracy", 0.5)]  # fmt: skip
    assert (
        "| arc_easy | acc | ↑ | 0.25 | 0.5 | [allenai/ai2_arc](https://huggingface.co/datasets/allenai/ai2_arc) (test) |"
        in card.text
    )
    assert "| capitals | right_capital | ↑ | 0.7083 | 0.4583 | local files |" in card.text


def test_a_damaged_lm_eval_file_is_one_error_naming_it(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "lm_eval.json").write_text(json.dumps({"tasks": [{"task": "x"}]}))
    adapter = make_adapter(run / "adapter", tiny_model_dir)
    with pytest.raises(DataError, match=r"lm_eval\.json is damaged"):
        package_adapter(adapter, tmp_path / "pkg", PackageSpec(name="acme/x", version="1.0.0", base_model_id=BASE_ID))
