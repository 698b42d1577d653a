"""Axolotl's `datasets` / `test_datasets` / `val_set_size` / `chat_template` → the `data` section (SFTDataModule).

One data set becomes `data.train_file` (a path, or {path, name, split, revision} for a Hub data set) with the
run-wide `format`, `columns` and `roles`; several become `data.train_datasets`, each entry with its own format,
columns and roles, used whole as Axolotl concatenates them. A `type` maps to a format, its field settings to
`columns`, a chat data set's `roles` ({target: [names]}) to `roles` ({name: target}); what has no equivalent is
dropped with a reason (see `axolotl_keys.DATASET_REASONS`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lightning_peft.errors import ConfigError
from lightning_peft.interop.axolotl_keys import (
    AXOLOTL_TEMPLATES,
    DATA_SUFFIXES,
    DATASET_REASONS,
    FALLBACK_PREFIX,
    ROLES,
    SHAREGPT_ROLES,
    UNKNOWN,
)
from lightning_peft.interop.axolotl_values import number, show, unset


class DataConversion:
    """The data steps of `axolotl_convert.Converter` (a mixin: it reads and writes the converter's state)."""

    # Defined by Converter: the data section being written, the notes, and taking / dropping Axolotl keys.
    data: dict[str, Any]
    notes: list[str]
    take: Callable[..., Any]
    drop: Callable[[str, Any, str], None]

    def _data(self) -> None:
        datasets = self.take("datasets")
        if datasets is None:
            self.notes.append("no `datasets`: set data.train_file to a data file or Hub data set before running.")
        elif not isinstance(datasets, list):
            raise ConfigError(f"`datasets` must be a list of data sets (path, type ...), got {show(datasets)}.")
        elif len(datasets) == 1:
            self._dataset(datasets[0], "datasets[0]", "train_file")
        else:
            # Axolotl concatenates its data sets; train_datasets entries without weight or count do the same.
            self.data["train_datasets"] = [self._mixture_entry(e, f"datasets[{i}]") for i, e in enumerate(datasets)]
        tests = self.take("test_datasets")
        fraction = self.take("val_set_size", 0)
        if isinstance(tests, list) and tests:
            self._dataset(tests[0], "test_datasets[0]", "val_file")
            for i, other in enumerate(tests[1:], 1):
                self.drop(f"test_datasets[{i}]", other, "SFTDataModule validates on one file")
            if fraction:
                self.drop("val_set_size", fraction, "test_datasets gives the validation data")
        elif fraction:
            value = number("val_set_size", fraction)
            if 0 < value < 1:
                self.data["val_fraction"] = value
            else:
                self.drop("val_set_size", fraction, "a count of examples; data.val_fraction holds out a fraction (0-1)")
        self._chat_template("chat_template", self.take("chat_template"), self.take("chat_template_jinja"))

    def _dataset(self, entry: Any, where: str, setting: str) -> None:
        """One data set as data.train_file or data.val_file: a path, or {path, name, split, revision} for the Hub."""
        source, kind, fmt, mappings = self._source(entry, where, setting)
        self.data[setting] = source["path"] if len(source) == 1 else source
        if setting == "train_file":
            if fmt is not None:
                self.data["format"] = fmt
            self.data.update(mappings)
        elif kind is not None and (fmt, mappings) != (
            self.data.get("format"),
            {key: self.data[key] for key in ("columns", "roles") if key in self.data},
        ):
            self.drop(
                f"{where}.type", kind, "the validation file is read with the training data's format, columns and roles"
            )

    def _mixture_entry(self, entry: Any, where: str) -> dict[str, Any]:
        """One entry of data.train_datasets: the source with its own format, columns and roles."""
        source, _, fmt, mappings = self._source(entry, where, "train_datasets")
        return {**source, **({"format": fmt} if fmt else {}), **mappings}

    def _source(self, entry: Any, where: str, setting: str) -> tuple[dict[str, Any], Any, str | None, dict[str, Any]]:
        """(the source: {path} or a Hub {path, name, split, revision}; Axolotl's type; our format; the non-empty
        `columns` and `roles` mappings)."""
        if not isinstance(entry, Mapping):
            raise ConfigError(f"`{where}` must be a mapping with `path` and `type`, got {show(entry)}.")
        rest = {str(k): v for k, v in entry.items()}
        source = self._location(rest, where, setting)
        kind = rest.pop("type", None)
        fmt, columns, roles = self._format(kind, rest, where)
        for key, value in rest.items():
            if not unset(value):
                self.drop(f"{where}.{key}", value, DATASET_REASONS.get(key, UNKNOWN))
        return source, kind, fmt, {key: value for key, value in (("columns", columns), ("roles", roles)) if value}

    def _location(self, rest: dict[str, Any], where: str, setting: str) -> dict[str, Any]:
        path = self._data_file(rest, where, setting)
        hub = {key: rest.pop(key) for key in ("name", "revision", "split") if not unset(rest.get(key))}
        if not _is_hub_id(path):
            split = hub.pop("split", None)
            if split not in (None, "train"):
                self.drop(f"{where}.split", split, "a file is read whole, a save_to_disk folder by its train split")
            rest.update(hub)  # name and revision: dropped with their reasons
            return {"path": path}
        self.notes.append(
            f"{where}.path {path!r} is not a local file, so it is loaded from the Hugging Face Hub with `datasets` "
            "(pip install 'lightning-peft[data]'); offline (HF_HUB_OFFLINE=1) it must be in the `datasets` cache."
        )
        # Unless told, Axolotl reads the "train" split of `datasets` and the "test" split of `test_datasets`;
        # data.train_file reads "train" too, but data.val_file "validation": spell that one out.
        hub.setdefault("split", "test" if setting == "val_file" else "train")
        if setting != "val_file" and hub["split"] == "train":
            del hub["split"]
        return {"path": path, **hub}

    def _data_file(self, rest: dict[str, Any], where: str, setting: str) -> str:
        files, path = rest.pop("data_files", None), rest.pop("path", None)
        rest.pop("ds_type", None)  # the reader goes by the file's extension
        rest.pop("trust_remote_code", None)
        if isinstance(files, list):
            for extra in files[1:]:
                self.drop(f"{where}.data_files", extra, "one file per data set; merge the files into one")
            files = files[0] if files else None
        source = files or path
        if unset(source):
            raise ConfigError(f"`{where}` has neither `path` nor `data_files`.")
        source = str(source)
        if source.startswith(("s3://", "gs://", "gcs://", "http://", "https://")):
            self.notes.append(f"{where} is remote ({source}): download it and set data.{setting} to the local file.")
        return source

    def _format(self, kind: Any, rest: dict[str, Any], where: str) -> tuple[str | None, dict[str, str], dict[str, str]]:
        """The SFTDataModule format, column and role mappings for a data set entry (its format keys are taken out)."""
        fmt = _format_of(kind)
        columns: dict[str, str] = {}
        roles: dict[str, str] = {}
        if fmt is None:
            if kind is not None:
                self.drop(
                    f"{where}.type",
                    kind,
                    "no lightning-peft data format matches it (messages, prompt_completion, alpaca, text); "
                    "data.format stays auto, which detects the format from the file's columns",
                )
            return None, columns, roles
        if fmt == "text" and rest.get("field") not in (None, "text"):
            columns["text"] = str(rest["field"])
        rest.pop("field", None)
        if fmt == "messages":
            self._chat_dataset(rest, where, columns, roles)
        return fmt, columns, roles

    def _chat_dataset(self, rest: dict[str, Any], where: str, columns: dict[str, str], roles: dict[str, str]) -> None:
        field_messages = rest.pop("field_messages", None)
        if field_messages not in (None, "messages"):
            columns["messages"] = str(field_messages)
        mapping = dict(rest.pop("message_property_mappings", None) or {})
        for legacy, prop in (("message_field_role", "role"), ("message_field_content", "content")):
            if (value := rest.pop(legacy, None)) is not None:
                mapping.setdefault(prop, value)
        fields = (mapping.pop("role", "role"), mapping.pop("content", "content"))
        if fields not in (("role", "content"), ("from", "value")):
            self.drop(
                f"{where}.message_property_mappings",
                {"role": fields[0], "content": fields[1]},
                "messages are read as {role, content} or ShareGPT {from, value}; rename the fields in the file",
            )
        for prop, column in mapping.items():
            self.drop(f"{where}.message_property_mappings.{prop}", column, "only role and content are read")
        if (axolotl_roles := rest.pop("roles", None)) is not None:
            roles.update(self._roles(axolotl_roles, where))
        trained = rest.pop("roles_to_train", None)
        if trained is not None and set(trained) != {"assistant"}:  # Axolotl's default: ["assistant"]
            self.drop(
                f"{where}.roles_to_train",
                trained,
                "the loss is on assistant turns (or on every token with data.train_on_prompt: true)",
            )
        eos = rest.pop("train_on_eos", None)
        if eos not in (None, "turn"):  # Axolotl's default: the end of each trained turn, as lightning-peft does
            self.drop(f"{where}.train_on_eos", eos, "the end-of-turn token of each assistant turn is learned (`turn`)")
        self._chat_template(
            f"{where}.chat_template", rest.pop("chat_template", None), rest.pop("chat_template_jinja", None)
        )

    def _roles(self, roles: Any, where: str) -> dict[str, str]:
        """Axolotl's {target: [the data's role names]} as data.roles {name: target}, without the names that need no
        mapping (a standard role as itself, ShareGPT's human and gpt as user and assistant)."""
        pairs = (
            [(name, target) for target, names in roles.items() for name in (names or [])]
            if isinstance(roles, Mapping) and all(isinstance(n, list | tuple | type(None)) for n in roles.values())
            else None
        )
        if pairs is None or any(target not in ROLES or not isinstance(name, str) for name, target in pairs):
            self.drop(
                f"{where}.roles",
                roles,
                f"data.roles maps role names onto {', '.join(ROLES)} only, as lists of names under each of them",
            )
            return {}
        return {name: target for name, target in pairs if SHAREGPT_ROLES.get(name, name) != target}

    def _chat_template(self, key: str, template: Any, jinja: Any = None) -> None:
        """Axolotl's template name (or `jinja` + `chat_template_jinja`) → data.chat_template, one per run.

        Names whose Axolotl template renders exactly like a built-in here carry over; `tokenizer_default` is what
        lightning-peft does anyway; `tokenizer_default_fallback_X` is noted (the fallback applies only to a base
        without a template, which lightning-peft reports, naming data.chat_template).
        """
        if unset(template) or template == "tokenizer_default":
            if not unset(jinja):
                self.drop(f"{key}_jinja", jinja, "used only with chat_template: jinja")
            return
        template = str(template)
        if template.startswith(FALLBACK_PREFIX):
            fallback = template.removeprefix(FALLBACK_PREFIX)
            self.notes.append(
                f"{key}: {template}: the tokenizer's own chat template is used; if the base has none, set "
                f"data.chat_template: {AXOLOTL_TEMPLATES.get(fallback, fallback)}."
            )
            return
        if template == "jinja" and not unset(jinja):
            value = str(jinja)
        elif template in AXOLOTL_TEMPLATES:
            value = AXOLOTL_TEMPLATES[template]
        else:
            reason = (
                "chat_template: jinja needs chat_template_jinja (the template's text)"
                if template == "jinja"
                else f"no built-in template here renders like Axolotl's {template!r} (built-ins: "
                f"{', '.join(sorted(set(AXOLOTL_TEMPLATES.values())))}); save Axolotl's "
                f"src/axolotl/utils/chat_templates/templates/{template}.jinja and set data.chat_template to its path"
            )
            self.drop(key, template, reason)
            return
        if self.data.get("chat_template", value) != value:
            self.drop(key, template, "one chat template per run: data.chat_template is already set")
            return
        self.data["chat_template"] = value


def _format_of(kind: Any) -> str | None:
    """The SFTDataModule format for an Axolotl dataset `type`, or None."""
    return (
        {"alpaca": "alpaca", "chat_template": "messages", "completion": "text"}.get(kind)
        if isinstance(kind, str)
        else None
    )


def _is_hub_id(path: str) -> bool:
    """ORG/NAME naming no local path and no data file: what `lightning_peft.data.sources.is_hub_id` reads as the
    Hub (restated here because importing `lightning_peft.data` imports torch, which `lpeft convert` must not)."""
    name = path.removeprefix("hf://datasets/").partition("@")[0]
    parts = name.split("/")
    return (
        len(parts) == 2
        and all(part and not part.startswith(".") for part in parts)
        and not name.startswith(("~", "/"))
        and Path(name).suffix.lower() not in DATA_SUFFIXES
        and not Path(path).expanduser().exists()
    )
