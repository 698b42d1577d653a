"""The adapter's model card (`README.md`), written from its manifest with huggingface_hub's `ModelCard`.

Metadata: `base_model` (a Hub id — when the base is a local folder with no known id, `base_model` and
`base_model_relation` are left out rather than filled with a path, and the body says so), `base_model_relation:
adapter`, `library_name: peft`, `pipeline_tag: text-generation`, license, Hub data sets, tags and a `model-index`
holding the evaluation metrics logged on Hub data sets (metrics on local files are in the body only). The body says what the adapter is, how to use it, how it was trained,
its loss curve, version history and checksums. Anything the run did not record is said to be unrecorded;
nothing is a placeholder. The text has no timestamp, so the same manifest always gives the same card.
"""

from __future__ import annotations

import re
from typing import Any

from lightning_peft.errors import ConfigError
from lightning_peft.hub.manifest import MANIFEST_FILE, HarnessScore, HubSource, Manifest
from lightning_peft.hub.plot import LOSS_CURVE_FILE

CARD_FILE = "README.md"
_METHOD_NAMES = {"LORA": "LoRA", "ADALORA": "AdaLoRA", "IA3": "IA³", "LOHA": "LoHa", "LOKR": "LoKr"}
_SPLITS = {"val": "validation", "test": "test"}
# Our metric names (`val_ppl`) in the Hub's metric vocabulary (model-index `metrics[].type`).
_HUB_METRICS = {"loss": "loss", "ppl": "perplexity", "acc": "accuracy"}
_HUB_ID = re.compile(r"^[A-Za-z0-9_-][\w.-]*/[A-Za-z0-9_-][\w.-]*$")


def build_card(manifest: Manifest, *, description: str | None, loss_curve_note: str | None) -> str:
    """The README.md text for a package whose manifest lists every file but the card itself.

    Args:
        manifest: The package manifest (see `manifest.py`).
        description: What the adapter does, in the author's words; a factual sentence is written without it.
        loss_curve_note: Why there is no loss curve image (None when `loss_curve.png` is in the package).

    Raises:
        ConfigError: the metadata does not survive a `ModelCard` round trip.
    """
    from huggingface_hub import ModelCard

    body = "\n\n".join(
        [
            f"# {manifest.name}",
            description or _default_description(manifest),
            _overview(manifest),
            _usage(manifest),
            _training(manifest, loss_curve_note),
            _evaluation(manifest),
            _compatibility(manifest),
            _history(manifest),
            _files(manifest),
        ]
    )
    text = f"---\n{_card_data(manifest).to_yaml()}\n---\n\n{body}\n"
    card = ModelCard(text)  # parses the metadata back: a card that does not round-trip is refused here
    if card.data.to_dict().get("base_model") != manifest.base_model.id:
        raise ConfigError(
            f"The model card's base_model does not round-trip ({card.data.to_dict().get('base_model')!r})."
        )
    return str(card)


def _card_data(manifest: Manifest) -> Any:
    from huggingface_hub import ModelCardData

    base_id = manifest.base_model.id
    results = _eval_results(manifest)
    extra = {"base_model_relation": "adapter"} if base_id else {}
    return ModelCardData(
        base_model=base_id,
        library_name="peft",
        pipeline_tag="text-generation",
        license=manifest.license,
        datasets=list(manifest.datasets.hub) or None,
        tags=list(package_tags(manifest)),
        model_name=manifest.name.split("/")[-1] if results else None,
        eval_results=results or None,
        **extra,
    )


def package_tags(manifest: Manifest) -> tuple[str, ...]:
    """The card's tags (what the Hub lists and `lpeft search --tag` matches)."""
    return ("lightning-peft", "peft", manifest.adapter.method.lower(), "adapter")


def _eval_results(manifest: Manifest) -> list[Any]:
    """The model-index entries: metrics measured on a Hub data set, named by its id, subset, split and revision.

    `dataset.type` is a Hub data set id, so metrics measured on local files or on a held-out part of the training
    data stay in the card's body and the manifest only (as transformers' Trainer drops results with no Hub data set).
    """
    from huggingface_hub import EvalResult

    by_role = {source.role: source for source in manifest.datasets.hub_sources}
    results = []
    for metric, value in sorted(manifest.evaluation.items()):
        split = _SPLITS.get(metric.split("_", 1)[0])
        source = by_role.get(split)
        if source is None:
            continue
        kind = _hub_metric(metric)
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=source.id,
                dataset_name=source.id,
                dataset_config=source.subset,
                dataset_split=source.split,
                dataset_revision=source.revision,
                metric_type=kind,
                metric_name=f"{split} {kind}",
                metric_value=value,
            )
        )
    for score in manifest.harness:  # harness tasks on Hub data sets: the adapter's score (the base's is in the body)
        if score.adapter is None or not _is_hub_dataset(score.dataset):
            continue
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name=score.task,
                dataset_type=score.dataset,
                dataset_name=score.task,
                dataset_config=score.dataset_config,
                dataset_split=score.split,
                metric_type=_HUB_METRICS.get(score.metric, score.metric),
                metric_name=f"{score.task} {score.metric}",
                metric_value=score.adapter,
            )
        )
    return results


def _hub_metric(metric: str) -> str:
    """`val_ppl` -> `perplexity`: the metric's kind in the Hub's vocabulary (the split goes in `dataset.split`)."""
    kind = metric.split("_", 1)[-1]
    return _HUB_METRICS.get(kind, kind)


def _eval_data(manifest: Manifest) -> str:
    """What the metrics were measured on, in words: the validation/test files or Hub data sets."""
    datasets = manifest.datasets
    named = [f"{role}: `{datasets.files[role]}`" for role in ("validation", "test") if role in datasets.files]
    named += [_hub_source_text(s) for s in datasets.hub_sources if s.role in ("validation", "test")]
    return "; ".join(named) if named else "a held-out part of the training data, or data not recorded"


def _hub_source_text(source: HubSource) -> str:
    extras = [f"{key} `{value}`" for key, value in (("subset", source.subset), ("split", source.split),
              ("revision", source.revision)) if value]  # fmt: skip
    link = f"[{source.id}](https://huggingface.co/datasets/{source.id})"
    return f"{source.role}: {link}" + (f" ({', '.join(extras)})" if extras else "")


def _method(manifest: Manifest) -> str:
    method = manifest.adapter.method
    return _METHOD_NAMES.get(method, method)


def _base_link(manifest: Manifest) -> str:
    base_id = manifest.base_model.id
    return f"[{base_id}](https://huggingface.co/{base_id})" if base_id else "a local base model with no Hub id"


def _default_description(manifest: Manifest) -> str:
    files = manifest.datasets.files
    data = f", fine-tuned on `{files['train']}`" if files.get("train") else ""
    return f"A {_method(manifest)} adapter for {_base_link(manifest)}{data}, trained and packaged with lightning-peft."


def _overview(manifest: Manifest) -> str:
    base = manifest.base_model
    rows = [
        (
            "Version",
            manifest.version + (f" (follows {manifest.parent_version})" if manifest.parent_version else ""),
        ),
        ("Base model", _base_link(manifest) + (f" at revision `{base.revision}`" if base.revision else "")),
        *([("Base weights", base.weights)] if base.weights else []),
        ("Base fingerprint", f"`{base.fingerprint}`"),
        ("Method", f"{_method(manifest)} ({_short_hparams(manifest.adapter.hyperparameters)})"),
        ("License", manifest.license or "none given by the author"),
    ]
    note = (
        ""
        if base.id
        else "\n\nThe base model was a local folder with no known Hub id, so the metadata has no `base_model`; "
        "the fingerprint above identifies it exactly."
    )
    return _table(("", ""), rows) + note


def _short_hparams(hparams: dict[str, Any]) -> str:
    keys = ("r", "lora_alpha", "lora_dropout", "num_virtual_tokens", "target_modules")
    return ", ".join(f"{k}={_fmt(hparams[k])}" for k in keys if k in hparams) or "default settings"


def _usage(manifest: Manifest) -> str:
    name, version = manifest.name, manifest.version
    base = manifest.base_model.id or "path/to/the/base-model"
    short = name.split("/")[-1]
    if manifest.base_model.alias:
        return _alias_usage(manifest, base, short)
    peft = (
        "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
        + (_adapter_tokenizer_lines(manifest) or f'tokenizer = AutoTokenizer.from_pretrained("{base}")\n')
        + f'model = PeftModel.from_pretrained(base, "{name}", revision="v{version}")\n```'
    )
    lpeft = (
        f"```bash\nlpeft pull {name}@{version} --to adapters/{short} --base {base}  # checks checksums and the base\n"
        f"lpeft validate --config run.yaml --model.adapter_path adapters/{short}\n```"
    )
    serving = manifest.serving
    if serving.vllm_compatible:
        rank = f" --max-lora-rank {serving.max_lora_rank}" if serving.max_lora_rank else ""
        vllm = f"```bash\nvllm serve {base} --enable-lora --lora-modules {short}=adapters/{short}{rank}\n```"
    else:
        vllm = "vLLM cannot load this adapter as it is: " + " ".join(serving.problems)
    return f"## How to use\n\nWith PEFT:\n\n{peft}\n\nWith lightning-peft:\n\n{lpeft}\n\nWith vLLM:\n\n{vllm}"


def _adapter_tokenizer_lines(manifest: Manifest) -> str | None:
    """Code loading the adapter's own tokenizer when it ships one (its chat template; tokens the template added,
    whose embedding rows the adapter carries and the base must first make room for); None when it ships none."""
    if not any(entry.path == "tokenizer_config.json" for entry in manifest.files):
        return None
    lines = f'tokenizer = AutoTokenizer.from_pretrained("{manifest.name}", revision="v{manifest.version}")\n'
    if manifest.adapter.hyperparameters.get("trainable_token_indices"):
        lines += (
            "if len(tokenizer) > base.get_input_embeddings().num_embeddings:  # the tokens the chat template added\n"
            "    base.resize_token_embeddings(len(tokenizer))\n"
        )
    return lines


def _alias_usage(manifest: Manifest, base: str, short: str) -> str:
    """Usage for an adapter trained on a built-in alias: load that same base, so the logits are the trained ones."""
    name, version, alias = manifest.name, manifest.version, manifest.base_model.alias
    tokenizer = _adapter_tokenizer_lines(manifest)
    if tokenizer is None:
        imports = "from lightning_peft.models import load_base_model, load_tokenizer\n"
        tokenizer = f'tokenizer = load_tokenizer("{alias}")\n'
    else:
        imports = "from transformers import AutoTokenizer\n\nfrom lightning_peft.models import load_base_model\n"
    return (
        f"## How to use\n\nThis adapter was trained on {manifest.base_model.weights}, not on the files of "
        f"`{base}` itself: load that same base to get the logits it was trained for (lightning-peft converts it "
        f"from the package once, offline). `{base}`'s own weights are close but not identical.\n\n"
        f"```python\nfrom peft import PeftModel\n{imports}\n"
        f'base = load_base_model("{alias}")  # the built-in alias of {base}\n'
        + tokenizer
        + f'model = PeftModel.from_pretrained(base, "{name}", revision="v{version}")\n```\n\n'
        f"```bash\nlpeft pull {name}@{version} --to adapters/{short}  # checks checksums and the base fingerprint\n```"
    )


def _training(manifest: Manifest, loss_curve_note: str | None) -> str:
    training = manifest.training
    summary = training.summary
    rows = [
        ("Steps", summary.get("steps")),
        ("Tokens", summary.get("tokens")),
        ("Duration", f"{summary['duration_s']:.0f} s" if summary.get("duration_s") is not None else None),
        ("Hardware", summary.get("hardware")),
        ("Final training loss", summary.get("final_train_loss")),
        ("Final validation loss", summary.get("final_val_loss")),
    ]
    parts = ["## Training", _table(("", ""), [(k, "not recorded" if v is None else _fmt(v)) for k, v in rows])]
    hparams = {**manifest.adapter.hyperparameters, **training.hyperparameters}
    parts.append(
        "Hyperparameters:\n\n" + _table(("setting", "value"), [(k, _fmt(v)) for k, v in sorted(hparams.items())])
    )
    parts.append(_data_sentence(manifest))
    if loss_curve_note is None:
        parts.append(f"![Training and validation loss]({LOSS_CURVE_FILE})")
    else:
        parts.append(loss_curve_note)
    sources = training.sources
    parts.append(
        f"Read from the run's {', '.join(f'`{s}`' for s in sources)}."
        if sources
        else "No run files (metrics.jsonl, metrics.csv, hparams.yaml, config.yaml) were found next to the adapter, so the run is not described here."
    )
    return "\n\n".join(parts)


def _data_sentence(manifest: Manifest) -> str:
    datasets = manifest.datasets
    parts = [f"{role}: `{name}` (a local file)" for role, name in sorted(datasets.files.items())]
    parts += [_hub_source_text(source) for source in datasets.hub_sources]
    read = {source.id for source in datasets.hub_sources}
    parts += [f"[{d}](https://huggingface.co/datasets/{d})" for d in datasets.hub if d not in read]
    return "Data: " + "; ".join(parts) + "." if parts else "Data: not recorded."


def _evaluation(manifest: Manifest) -> str:
    metrics = manifest.evaluation
    if not metrics:
        text = "## Evaluation\n\nNo evaluation metrics were logged during training."
    else:
        rows = [(k, _fmt(v)) for k, v in sorted(metrics.items())]
        text = f"## Evaluation\n\nLast logged values, on {_eval_data(manifest)}:\n\n" + _table(
            ("metric", "value"), rows
        )
    return text + _harness_table(manifest)


def _harness_table(manifest: Manifest) -> str:
    """The lm-evaluation-harness scores the run recorded: the base before training beside the adapter after."""
    if not manifest.harness:
        return ""
    rows = [
        (
            score.task,
            score.metric + ("" if score.filter == "none" else f" ({score.filter})"),
            {True: "↑", False: "↓"}.get(score.higher_is_better, ""),  # type: ignore[arg-type]
            "—" if score.base is None else _fmt(score.base),
            "—" if score.adapter is None else _fmt(score.adapter),
            _harness_data(score),
        )
        for score in manifest.harness
    ]
    return (
        "\n\nlm-evaluation-harness (`LmEvalCallback`), the base model before training and this adapter after it:\n\n"
        + _table(("task", "metric", "", "base", "adapter", "data"), rows)
    )


def _harness_data(score: HarnessScore) -> str:
    if _is_hub_dataset(score.dataset):
        return f"[{score.dataset}](https://huggingface.co/datasets/{score.dataset})" + (
            f" ({score.split})" if score.split else ""
        )
    return "local files" if score.dataset else "not recorded"


def _is_hub_dataset(path: str | None) -> bool:
    """A harness task's `dataset_path` names a Hub data set (ORG/NAME), not a loader (`json`) for local files."""
    return bool(path and _HUB_ID.match(path))


def _compatibility(manifest: Manifest) -> str:
    serving = manifest.serving
    lines = [
        "## Compatibility",
        f"The base model's fingerprint (`{manifest.base_model.fingerprint_method}`: a sha256 over its config "
        "and every weight tensor) is recorded in `lpeft_manifest.json`. `lpeft pull ... --base MODEL` and "
        "`lpeft inspect DIR --base MODEL` refuse a base whose weights differ.",
    ]
    if serving.vllm_compatible:
        lines.append("Serving: vLLM can load it as a LoRA adapter. " + " ".join(serving.notes))
    else:
        lines.append("Serving: " + " ".join(serving.problems))
    return "\n\n".join(line.rstrip() for line in lines)


def _history(manifest: Manifest) -> str:
    current = f"- **{manifest.version}** (this version)" + (f": {manifest.message}" if manifest.message else "")
    earlier = [f"- {v}" for v in manifest.history]
    return "## Version history\n\n" + "\n".join([current, *earlier])


def _files(manifest: Manifest) -> str:
    rows = [(f"`{f.path}`", f"{f.size:,}", f"`{f.sha256}`") for f in manifest.files]
    return (
        "## Files\n\n"
        + _table(("file", "bytes", "sha256"), rows)
        + f"\n\n`{MANIFEST_FILE}` lists these and this card with their checksums; `lpeft pull` verifies them all."
    )


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)
