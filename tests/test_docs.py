"""The README (the front page) and the documentation site in docs/ (MkDocs, mkdocs.yml).

The site builds with `mkdocs build --strict`, which fails on a link to a missing page or heading and on a page left
out of the nav (and a test checks that it does fail on those). What the pages name must exist: every `lpeft`
command and option, every `--model.*` / `--data.*` / `--trainer.*` flag and YAML key, every `lightning_peft.*`
object, every file of the repository; every Python block compiles. The README keeps the Quickstart's two set-up
commands, links to every page, and takes its measured claims from the pages.
"""

from __future__ import annotations

import importlib
import inspect
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"
MKDOCS_YML = REPO / "mkdocs.yml"
PAGES = sorted(DOCS.rglob("*.md"))
# The README and every page: (name for messages, text).
TEXTS = [("README.md", README.read_text())] + [(f"docs/{p.relative_to(DOCS)}", p.read_text()) for p in PAGES]

# Flags of other programs that the pages show (torchrun, SLURM, pip, pytest, vLLM, the benchmark scripts).
OTHER_PROGRAMS_FLAGS = {
    "--nnodes", "--nproc-per-node", "--node-rank", "--master-addr", "--master-port",  # torchrun
    "--nodes", "--ntasks-per-node", "--gpus-per-node",  # SLURM
    "--no-deps",  # pip
    "--max-lora-rank",  # vLLM
    "--strict",  # mkdocs build
}  # fmt: skip
# Deliberately wrong, in the pages' examples of error messages.
WRONG_ON_PURPOSE = {"--model.lerning_rate"}
# Files the pages name that a run or a script writes, not the repository.
WRITTEN_FILES = {"benchmarks/results/gpu.md"}


def _mkdocs_build(config_file: Path, site_dir: Path) -> subprocess.CompletedProcess:
    command = ["build", "--strict", "--config-file", str(config_file), "--site-dir", str(site_dir)]
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", *command],
        capture_output=True,
        text=True,
        cwd=config_file.parent,
        timeout=300,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    result = _mkdocs_build(MKDOCS_YML, site_dir)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return site_dir


def test_site_builds_strict(site):
    assert (site / "index.html").is_file()
    for page in PAGES:
        if page.name != "index.md":
            assert (site / page.relative_to(DOCS).with_suffix("") / "index.html").is_file(), page


@pytest.mark.parametrize(
    "broken",
    ["[a page](no-such-page.md)", "[a heading](performance.md#no-such-heading)", "[a local one](#no-such-heading)"],
)
def test_strict_build_fails_on_a_broken_link(tmp_path, broken):
    """The build above can fail: the same site with one broken link does not build."""
    shutil.copy(MKDOCS_YML, tmp_path / "mkdocs.yml")
    shutil.copytree(DOCS, tmp_path / "docs")
    with open(tmp_path / "docs" / "index.md", "a") as index:
        index.write(f"\nSee {broken}.\n")
    result = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-" in result.stdout + result.stderr


def test_strict_build_fails_on_a_page_left_out_of_the_nav(tmp_path):
    shutil.copy(MKDOCS_YML, tmp_path / "mkdocs.yml")
    shutil.copytree(DOCS, tmp_path / "docs")
    (tmp_path / "docs" / "orphan.md").write_text("# Orphan\n")
    result = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0 and "orphan.md" in result.stdout + result.stderr


# --- Markdown helpers --------------------------------------------------------------------------------------------


def _blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced code block."""
    blocks, lang, lines = [], None, []
    for line in text.splitlines():
        stripped = line.strip()
        if lang is None and stripped.startswith("```"):
            lang, lines = stripped[3:].strip(), []
        elif lang is not None and stripped == "```":
            blocks.append((lang, "\n".join(lines)))
            lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def _prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"(?ms)^\s*```.*?^\s*```\s*$", "", text)


def _code_spans(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", _prose(text))


def _links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", _prose(text))


def _nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


# --- The README ------------------------------------------------------------------------------------------------


def _section(text: str, title: str) -> str:
    match = re.search(rf"(?ms)^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def test_readme_quickstart_is_the_two_make_commands():
    quickstart = _section(README.read_text(), "Quickstart")
    bash = [code for lang, code in _blocks(quickstart) if lang == "bash"]
    assert len(bash) == 1, "the Quickstart has one bash block"
    commands = [line.split("#")[0].strip() for line in bash[0].splitlines() if line.strip()]
    assert commands == ["make quickstart", "make test"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"(?m)^quickstart: install\n\tlpeft fit --config examples/quickstart\.yaml$", makefile)
    assert re.search(r"(?m)^test: install-dev\n\t\$\(PYTHON\) -m pytest", makefile)
    assert "`lpeft fit --config examples/quickstart.yaml`" in quickstart


def test_readme_links_every_page_and_every_link_resolves(site):
    text = README.read_text()
    linked = set()
    for link in _links(text):
        if link.startswith(("http://", "https://")):
            continue
        path, _, anchor = link.partition("#")
        assert (REPO / path).exists(), f"README.md links to {link}, which does not exist"
        if path.startswith("docs/") and path.endswith(".md"):
            page = path.removeprefix("docs/")
            linked.add(page)
            if anchor:
                html = site / ("" if page == "index.md" else page.removesuffix(".md")) / "index.html"
                assert f'id="{anchor}"' in html.read_text(), f"README.md links to {link}: no such heading"
    nav = _nav_pages(yaml.safe_load(MKDOCS_YML.read_text())["nav"])
    assert sorted(nav) == sorted(str(p.relative_to(DOCS)) for p in PAGES)
    assert set(nav) <= linked, f"pages the README does not link to: {sorted(set(nav) - linked)}"


def _numbers(text: str) -> set[str]:
    return set(re.findall(r"\d[\d,]*(?:\.\d+)?(?:e-\d+)?", text))


def test_readme_claims_are_the_measured_figures():
    """Every number of 'Why it is better' is one the performance report and its neighbours give."""
    claims = _section(README.read_text(), "Why it is better")
    measured = _numbers("\n".join(p.read_text() for p in PAGES))
    missing = {n for n in _numbers(claims) if n not in measured}
    assert not missing, f"README numbers no page measures: {sorted(missing)}"
    assert len(re.findall(r"(?m)^- \*\*", claims)) == 3


# --- What the pages name exists --------------------------------------------------------------------------------


@cache
def _cli():
    from lightning_peft.cli import LIGHTNING_SUBCOMMANDS, cli

    return cli, set(LIGHTNING_SUBCOMMANDS)


@cache
def _init_params(kind: str) -> set[str]:
    if kind == "model":
        from lightning_peft.module import PeftCausalLM as cls
    elif kind == "data":
        from lightning_peft.data import SFTDataModule as cls
    else:
        from lightning.pytorch import Trainer as cls
    return set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}


def _lightning_flag_ok(flag: str) -> bool:
    if flag in {"--config", "--print_config", "--ckpt_path", "--help", "--seed_everything"}:
        return True
    section, _, key = flag.removeprefix("--").partition(".")
    key = key.split("+")[0]
    # `--model.*`: the section's flags as a whole
    return section in {"model", "data", "trainer"} and (key in {"", "help"} or key in _init_params(section))


def _commands(text: str) -> list[tuple[str, str]]:
    """(where, command line) for each `lpeft ...` / `python -m lightning_peft ...` in code blocks and code spans,
    continuation lines joined."""
    found = []
    for lang, code in _blocks(text):
        if lang not in {"", "bash", "console"}:
            continue
        lines = code.splitlines()
        joined: list[str] = []
        for line in lines:
            continuing = joined and (joined[-1].endswith("\\") or re.match(r"^\s+[\[(-]", line))
            if continuing:
                joined[-1] = joined[-1].rstrip("\\") + " " + line.strip()
            else:
                joined.append(line)
        found += [("code block", line) for line in joined]
    found += [("code span", span) for span in _code_spans(text)]
    commands = []
    for where, line in found:
        line = re.sub(r"\s#.*$", "", line)
        for part in line.split(";"):
            match = re.search(r"(?:^|\$ |-m )(?:lpeft|lightning_peft)(?=\s|$)(.*)$", part.strip())
            if match:
                commands.append((where, match.group(1)))
    return commands


@pytest.mark.parametrize(("name", "text"), TEXTS, ids=[name for name, _ in TEXTS])
def test_commands_and_their_options_exist(name, text):
    cli, lightning = _cli()
    stale = []
    for where, args in _commands(text):
        words = args.split()
        command = next((w for w in words if not w.startswith("-")), None)
        flags = [f.split("=")[0] for f in re.findall(r"(?<![\w-])--?[A-Za-z][\w.+=-]*", args)]
        if command is None or command not in cli.commands:
            if command is not None and re.fullmatch(r"[a-z]+", command):
                stale.append(f"{where}: lpeft {command}: no such command")
            allowed = {"--version", "--debug", "--help", "-h"}
        elif command in lightning:
            stale += [f"{where}: lpeft {command} {f}" for f in flags if not _lightning_flag_ok(f)]
            continue
        else:
            params = cli.commands[command].params
            allowed = {o for p in params for o in [*p.opts, *p.secondary_opts]} | {"--help", "-h"}
        stale += [f"{where}: lpeft {command or ''} {f}" for f in flags if f not in allowed | WRONG_ON_PURPOSE]
    assert not stale, f"{name} names commands or options lpeft does not have:\n" + "\n".join(stale)


def _benchmark_flags() -> set[str]:
    """The options the scripts under benchmarks/ define (argparse)."""
    option = re.compile(r"add_argument\(\s*\"(--[\w-]+)\"")
    return {flag for script in (REPO / "benchmarks").rglob("*.py") for flag in option.findall(script.read_text())}


def _all_flags() -> set[str]:
    cli, _ = _cli()
    flags = {"--version", "--debug", "--help"} | _benchmark_flags()
    for command in cli.commands.values():
        flags |= {o for p in command.params for o in [*p.opts, *p.secondary_opts] if o.startswith("--")}
    return flags


@pytest.mark.parametrize(("name", "text"), TEXTS, ids=[name for name, _ in TEXTS])
def test_every_flag_named_anywhere_exists(name, text):
    """Flags in prose too (`--no-verify`, `--model.adapter_path`): an option of some lpeft command, a config key,
    or another program's."""
    known = _all_flags() | OTHER_PROGRAMS_FLAGS | WRONG_ON_PURPOSE
    named = set(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*(?:\.[\w-]+)*", text))
    stale = sorted(f for f in named if f not in known and not _lightning_flag_ok(f))
    assert not stale, f"{name} names options nothing has: {stale}"


def _yaml_sections(config: dict) -> list[tuple[str, dict]]:
    sections = []
    for section in ("model", "data", "trainer"):
        value = config.get(section)
        if isinstance(value, dict) and "class_path" not in value:
            sections.append((section, value))
    return sections


@pytest.mark.parametrize(("name", "text"), TEXTS, ids=[name for name, _ in TEXTS])
def test_yaml_blocks_parse_and_their_keys_exist(name, text):
    stale = []
    for lang, code in _blocks(text):
        if lang != "yaml":
            continue
        config = yaml.safe_load(code)
        assert isinstance(config, dict), f"{name}: a YAML block that is not a mapping:\n{code}"
        if "task" in config:  # an lm-evaluation-harness task file (docs/evaluation.md)
            stale += sorted(set(config) - _harness_task_keys())
            continue
        assert set(config) <= {"model", "data", "trainer", "seed_everything"}, f"{name}: {sorted(config)}"
        for section, values in _yaml_sections(config):
            stale += [f"{section}.{key}" for key in values if key not in _init_params(section)]
    assert not stale, f"{name}: YAML keys that are not settings: {stale}"


def _harness_task_keys() -> set[str]:
    import dataclasses

    pytest.importorskip("lm_eval")
    from lm_eval.config.task import TaskConfig

    return {field.name for field in dataclasses.fields(TaskConfig)}


def test_the_model_table_lists_settings():
    """The first column of the configuration page's model table: `PeftCausalLM` arguments, every one."""
    page = (DOCS / "configuration.md").read_text()
    table = re.search(r"(?ms)^## The model \(`PeftCausalLM`\)\n\n(\|.*?)\n\n", page).group(1)
    keys = [k for row in table.splitlines()[2:] for k in re.findall(r"`(\w+)`", row.split("|")[1])]
    assert len(keys) > 10
    assert not set(keys) - _init_params("model"), sorted(set(keys) - _init_params("model"))


@pytest.mark.parametrize(("name", "text"), TEXTS, ids=[name for name, _ in TEXTS])
def test_python_blocks_compile_and_import(name, text):
    for lang, code in _blocks(text):
        if lang != "python":
            continue
        compile(code, name, "exec")
        for module, names in re.findall(r"(?m)^from (lightning_peft[\w.]*) import (.+)$", code):
            imported = importlib.import_module(module)
            for attr in (n.strip() for n in names.split(",")):
                assert hasattr(imported, attr), f"{name}: from {module} import {attr}"


def _resolve(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize(("name", "text"), TEXTS, ids=[name for name, _ in TEXTS])
def test_named_objects_and_files_exist(name, text):
    names = set(re.findall(r"\blightning_peft(?:\.\w+)+", text))
    missing = sorted(n for n in names if not _resolve(re.sub(r"\.(py|jinja)$", "", n)))
    paths = set(re.findall(r"(?<![\w/.~-])((?:lightning_peft|tests|benchmarks|examples)/[\w./*-]*[\w*/])", text))
    missing += sorted(p for p in paths if p not in WRITTEN_FILES and not list(REPO.glob(p.rstrip("/"))))
    assert not missing, f"{name} names what the repository does not have: {missing}"


@pytest.mark.parametrize(("name", "text"), TEXTS, ids=[name for name, _ in TEXTS])
def test_version_references_parse(name, text):
    """`acme/capitals@^1.2` and the like: `lpeft pull` and `AdapterServer.load` take them as written."""
    from lightning_peft.errors import ConfigError
    from lightning_peft.hub.versions import check_spec

    for spec in re.findall(r"(?<![\w/:.-])[\w-]+/[\w.-]+@([^\s`\"']+)", text):  # not hf://datasets/X@revision
        if spec == "^^1":  # the commands page's example of a malformed range
            with pytest.raises(ConfigError):
                check_spec(spec)
        else:
            check_spec(spec)
