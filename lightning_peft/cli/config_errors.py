"""One-line messages for what the config parser (jsonargparse) rejects.

jsonargparse reports a bad config as a nested, multi-line explanation (every Union branch it tried) after the
whole usage block. A user needs one line: the file, the key path as they wrote it, the value, and the fix (the
closest valid key or the allowed values). This module turns jsonargparse's message into that line; it imports
neither torch nor Lightning, so it is testable on its own.
"""

from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Callable, Sequence
from typing import Any

# How jsonargparse 4.x words the errors we rewrite (jsonargparse/_core.py, _typehints.py).
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_NOT_ACCEPTED = re.compile(r"(?:does not accept option|Option) '([^']+)'(?: is not accepted)?")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: --(\S+?)(?:=(\S*)|\s+(\S+))?(?:\s|$)")
_LITERAL = re.compile(r"Expected a typing\.Literal\[(.*)\]")
_EXPECTED = re.compile(r"Expected a (?:<class '([^']+)'>|(\S+?))(?:\.\s|\s*$)", re.MULTILINE)
_GOT_VALUE = re.compile(r"Got value: (.*)")
_GIVEN_VALUE = re.compile(r"Given value: (.*)")
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")
_MISSING = object()
# The keys a class section holds besides its arguments (`model: {class_path: ..., init_args: {...}}`).
_CLASS_KEYS = ("class_path", "init_args", "dict_kwargs", "__path__")

ValidKeys = Callable[[str, "str | None"], Sequence[str]]
"""Valid keys of a section (`trainer`, `model`, or `""` for the top level), given the class_path that section
names if any; keys are relative to the section."""


def one_line(message: str, args: Sequence[str], valid_keys: ValidKeys) -> str:
    """jsonargparse's error `message` for command-line `args`, as one line naming file, key, value and fix."""
    if message.startswith("Problems parsing config"):
        return _yaml_error(args) or _first_line(message)
    unknown = _unknown_key(message)
    if unknown is not None:
        return _unknown_key_line(unknown, message, args, valid_keys)
    if _LITERAL.search(message):
        return _literal_line(message, args)
    if _PARSER_KEY.search(message) and _EXPECTED.search(message):
        return _type_line(message, args)
    return _first_line(message)


def _unknown_key(message: str) -> str | None:
    """The full key path of an unknown key, or None when `message` is about something else."""
    if match := _UNRECOGNIZED.search(message):
        return _user_key(match.group(1))
    if match := _NOT_ACCEPTED.search(message):
        return _user_key(".".join([*_PARSER_KEY.findall(message), match.group(1)]))
    return None


def _unknown_key_line(key: str, message: str, args: Sequence[str], valid_keys: ValidKeys) -> str:
    section, _, name = key.rpartition(".")
    class_path = match.group(1) if (match := _CLASS_PATH.search(message)) else None
    candidates = [k for k in valid_keys(section, class_path) if "." not in k]
    close = difflib.get_close_matches(name, candidates, n=1)
    file, value = _source(key, args)
    line = f"unknown key {key}" + ("" if value is _MISSING else f" (value {_show(value)})")
    if close:
        line += f"; did you mean {_join(section, close[0])}?"
    elif candidates:
        line += f"; valid keys{' of ' + section if section else ''}: {', '.join(sorted(candidates))}"
    # jsonargparse stops at the first unknown key: name the others too, so that one run shows every typo.
    others = [
        other + (f" (did you mean {_join(other.rpartition('.')[0], match[0])}?)" if match else "")
        for other, names in _unknown_keys(args, valid_keys, {section: class_path})
        if other != key
        for match in [difflib.get_close_matches(other.rpartition(".")[2], names, n=1)]
    ]
    if others:
        line += f"; also unknown: {', '.join(others)}"
    return _in_file(file, line)


def _unknown_keys(
    args: Sequence[str], valid_keys: ValidKeys, class_paths: dict[str, str | None]
) -> list[tuple[str, list[str]]]:
    """Every unknown `section.key` (or top-level key) set in the config files or by flags, with the valid names of
    its section. Sections whose valid keys are not known (an empty list) are not judged; nor are deeper keys."""
    given: dict[str, set[str]] = {}  # section ("" for the top level) -> the names set in it
    for path in _config_files(args):
        tree = _load_yaml(path)
        if not isinstance(tree, dict):
            continue
        for top, value in tree.items():
            given.setdefault("", set()).add(str(top))
            if isinstance(value, dict):
                inner = (
                    {**value, **(value.get("init_args") or {})} if isinstance(value.get("init_args"), dict) else value
                )
                given.setdefault(str(top), set()).update(str(k) for k in inner if k not in _CLASS_KEYS)
                if isinstance(value.get("class_path"), str):
                    class_paths.setdefault(str(top), value["class_path"])
    for arg in args:
        flag = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        parts = _user_key(flag).split(".")
        if len(parts) == 2 and flag not in ("config", "print_config"):
            given.setdefault(parts[0], set()).add(parts[1])
    found = []
    for section, names in given.items():
        valid = sorted({k.split(".")[0] for k in valid_keys(section, class_paths.get(section))})
        if valid:
            found += [(_join(section, name), valid) for name in sorted(names) if name not in valid]
    return found


def _literal_line(message: str, args: Sequence[str]) -> str:
    """A value outside a `Literal[...]`: every allowed value of every branch jsonargparse tried."""
    key = _user_key(".".join(_PARSER_KEY.findall(message)))
    allowed: list[Any] = []
    for match in _LITERAL.finditer(message):
        # Union branches may allow the same value as int and as str (trainer.precision: 16 and "16"): show it once.
        allowed += [v for v in _literal_values(match.group(1)) if str(v) not in map(str, allowed)]
    if any(match.group(1) == "bool" for match in _EXPECTED.finditer(message)):  # `bool | Literal[...]`
        allowed = ["true", "false", *allowed]
    file, value = _source(key, args)
    if value is _MISSING:
        found = _GOT_VALUE.search(message) or _GIVEN_VALUE.search(message)
        value = found.group(1).strip() if found else "?"
    allowed_text = ", ".join(_show(v) for v in allowed)
    return _in_file(file, f"{key}={_show(value)} is not allowed; choose one of: {allowed_text}")


def _type_line(message: str, args: Sequence[str]) -> str:
    """A value of the wrong type (`trainer.max_steps: abc`): the types jsonargparse expected, None left out."""
    key = _user_key(".".join(_PARSER_KEY.findall(message)))
    expected: list[str] = []
    for match in _EXPECTED.finditer(message):
        # <class 'pathlib.Path'> reads better as Path; typing names (typing.Optional[...]) stay whole.
        name = match.group(1).rsplit(".", 1)[-1] if match.group(1) else match.group(2)
        if name not in expected and name != "NoneType":
            expected.append(name)
    file, value = _source(key, args)
    if value is _MISSING:
        found = _GOT_VALUE.search(message) or _GIVEN_VALUE.search(message)
        value = found.group(1).strip() if found else "?"
    return _in_file(file, f"{key}={_show(value)} is not valid; expected {' or '.join(expected) or 'another type'}")


def _yaml_error(args: Sequence[str]) -> str | None:
    """file:line:column and the problem, for the first config file that is not valid YAML."""
    import yaml

    for path in _config_files(args):
        try:
            with open(path, encoding="utf-8") as handle:
                yaml.safe_load(handle)
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
            context = f" ({err.context})" if err.context else ""
            return f"{where}: invalid YAML: {err.problem}{context}"
        except (OSError, yaml.YAMLError):
            continue
    return None


def _source(key: str, args: Sequence[str]) -> tuple[str | None, Any]:
    """Where `key` was set: (None, value) on the command line, (file, value) in a --config file, else
    (None, _MISSING). The command line wins over files, and a later file over an earlier one, as in jsonargparse."""
    for flag in _key_spellings(key):
        for i, arg in enumerate(args):
            if arg == f"--{flag}":
                return None, args[i + 1] if i + 1 < len(args) else _MISSING
            if arg.startswith(f"--{flag}="):
                return None, arg.split("=", 1)[1]
    for path in reversed(_config_files(args)):
        value = _lookup(_load_yaml(path), key.split("."))
        if value is not _MISSING:
            return path, value
    return None, _MISSING


def _lookup(tree: Any, parts: list[str]) -> Any:
    """`parts` in a loaded YAML tree, looking through `init_args` levels (`model: {init_args: {...}}`)."""
    if not parts:
        return tree
    if not isinstance(tree, dict):
        return _MISSING
    if parts[0] in tree:
        return _lookup(tree[parts[0]], parts[1:])
    if "init_args" in tree:
        return _lookup(tree["init_args"], parts)
    return _MISSING


def _config_files(args: Sequence[str]) -> list[str]:
    files = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-c", "--config")]
    return files + [a.split("=", 1)[1] for a in args if a.startswith("--config=")]


def _load_yaml(path: str) -> Any:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except (OSError, yaml.YAMLError):
        return None


def _key_spellings(key: str) -> list[str]:
    """`model.lr` can be given as `--model.lr` or `--model.init_args.lr` in subclass mode."""
    section, _, rest = key.partition(".")
    return [key, f"{section}.init_args.{rest}"] if rest else [key]


def _user_key(key: str) -> str:
    """The key path as users write it: without jsonargparse's `init_args` levels."""
    return ".".join(part for part in key.split(".") if part not in ("init_args", ""))


def _literal_values(text: str) -> list[Any]:
    try:
        values = ast.literal_eval(f"[{text}]")
    except (ValueError, SyntaxError):
        return [text]
    return list(values)


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) and (not value or " " in value) else str(value)


def _join(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def _in_file(file: str | None, line: str) -> str:
    return f"{file}: {line}" if file else line


def _first_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[0] if lines else "invalid configuration"
