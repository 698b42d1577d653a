"""Semantic versions of published adapters: strict parsing, bumps, immutability and the ranges `pull` takes."""

from __future__ import annotations

import pytest

from lightning_peft.errors import ConfigError
from lightning_peft.hub.versions import (
    latest,
    next_version,
    parent_of,
    parse_range,
    parse_version,
    resolve,
    tag_for,
    version_of_tag,
)

PUBLISHED = [parse_version(v) for v in ("0.9.0", "1.0.0", "1.2.0", "1.2.5", "1.3.0-rc.1", "1.10.0", "2.0.0", "2.1.0")]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("latest", "2.1.0"),
        ("", "2.1.0"),
        ("1.2.0", "1.2.0"),
        ("=1.2.0", "1.2.0"),
        ("v1.2.5", "1.2.5"),
        ("1.2", "1.2.5"),
        ("1", "1.10.0"),
        ("^1.2", "1.10.0"),
        ("^1.2.5", "1.10.0"),
        ("^0.9", "0.9.0"),
        ("~1.2", "1.2.5"),
        ("~1.2.0", "1.2.5"),
        ("~1", "1.10.0"),
        (">=1,<2", "1.10.0"),
        (">=1 <2", "1.10.0"),
        (">= 1.2, < 1.3", "1.2.5"),
        (">1.2", "2.1.0"),
        ("<=1.2", "1.2.5"),
        ("<1.2.5", "1.2.0"),
        ("1.3.0-rc.1", "1.3.0-rc.1"),
        (">=1.3.0-rc.1,<1.4", "1.3.0-rc.1"),
    ],
)
def test_resolve_specs(spec, expected):
    assert str(resolve(spec, PUBLISHED)) == expected


def test_ranges_skip_prereleases_unless_named():
    assert str(resolve(">=1.2.5,<1.4", PUBLISHED)) == "1.2.5"
    with pytest.raises(ConfigError, match=r"No published version satisfies '~1.3'; published: 0.9.0, 1.0.0"):
        resolve("~1.3", PUBLISHED)


def test_versions_order_numerically_not_as_text():
    assert latest(PUBLISHED) == parse_version("2.1.0")
    assert sorted(PUBLISHED)[-3] == parse_version("1.10.0")
    assert latest([parse_version("1.0.0-rc.1"), parse_version("1.0.0-rc.2")]) == parse_version("1.0.0-rc.2")
    assert latest([]) is None


@pytest.mark.parametrize("spec", ["^", "1.2.3.4", "1.x", "~>1", ">=1,,<", "1.2-rc.1", "banana"])
def test_invalid_specs(spec):
    with pytest.raises(ConfigError, match="Version spec"):
        parse_range(spec)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1.2", r"`--version`='1.2' is not a semantic version; use MAJOR.MINOR.PATCH"),
        ("01.2.3", "is not a semantic version"),
        ("one", "is not a semantic version"),
        ("1.0.0+build.5", r"has build metadata \(\+build.5\)"),
    ],
)
def test_parse_version_is_strict(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_version(text)


def test_tags():
    assert tag_for(parse_version("1.2.3")) == "v1.2.3"
    assert version_of_tag("v1.2.3") == parse_version("1.2.3")
    assert version_of_tag("1.2.3") is None and version_of_tag("vnext") is None


@pytest.mark.parametrize(
    ("published", "bump", "expected"),
    [
        ([], "major", "1.0.0"),
        ([], "minor", "0.1.0"),
        ([], "patch", "0.0.1"),
        (["1.2.3"], "major", "2.0.0"),
        (["1.2.3", "1.0.0"], "minor", "1.3.0"),
        (["1.2.3"], "patch", "1.2.4"),
        (["1.0.1-rc.1"], "patch", "1.0.1"),
        (["1.0.0", "2.0.0-rc.1"], "patch", "1.0.1"),
    ],
)
def test_bump_from_the_latest_release(published, bump, expected):
    assert str(next_version([parse_version(v) for v in published], bump=bump)) == expected


def test_first_version_defaults_to_1_0_0_and_later_ones_must_be_chosen():
    assert str(next_version([])) == "1.0.0"
    with pytest.raises(ConfigError, match=r"already has versions \(latest 1.2.0\); choose the next one"):
        next_version([parse_version("1.2.0")])


def test_published_versions_are_immutable():
    with pytest.raises(ConfigError, match=r"Version 1.2.0 is already published .* `--bump patch` gives 1.2.1"):
        next_version([parse_version("1.2.0")], version="1.2.0")
    with pytest.raises(ConfigError, match="either `--version` or `--bump`"):
        next_version([], version="1.0.0", bump="patch")
    with pytest.raises(ConfigError, match=r"`--bump`='huge' is not one of"):
        next_version([], bump="huge")


def test_parent_is_the_highest_older_version():
    assert parent_of(parse_version("1.5.0"), PUBLISHED) == parse_version("1.3.0-rc.1")
    assert parent_of(parse_version("0.1.0"), PUBLISHED) is None


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("latest", "2.0.0"),  # 2.1.0 is yanked
        ("^2", "2.0.0"),
        ("~1.2", "1.2.0"),  # 1.2.5 is yanked
        (">=1,<3", "2.0.0"),
        ("2", "2.0.0"),  # a prefix is a range
        ("2.1.0", "2.1.0"),  # an exact version resolves, yanked or not (PEP 592)
        ("=1.2.5", "1.2.5"),
    ],
)
def test_ranges_skip_yanked_versions(spec, expected):
    yanked = {parse_version("2.1.0"), parse_version("1.2.5")}
    assert str(resolve(spec, PUBLISHED, yanked=yanked)) == expected


def test_a_range_with_only_yanked_versions_names_them():
    with pytest.raises(ConfigError, match=r"satisfies '\^2'; published: .*2\.0\.0 \(yanked\), 2\.1\.0 \(yanked\)\."):
        resolve("^2", PUBLISHED, yanked={parse_version("2.0.0"), parse_version("2.1.0")})
