"""Semantic versions of published adapters: parsing, bumping and the ranges `pull` accepts.

Versions are parsed and ordered by the `semver` package (python-semver, strict SemVer 2.0.0, prerelease
precedence included). We chose it over `packaging.version`, which implements PEP 440: that accepts `1.2` as a
full version, reads `1.0.0-foo` as an error and `1.0.0-rc.1` as `1.0.0rc1`, and orders prereleases by other
rules — a published adapter's version must be exactly what its git tag says. Neither library parses npm-style
ranges (`^1.2`, `~1.2`), so this module turns a range into comparators, each checked with `semver`:

    1.2.3 / =1.2.3   exactly that version
    1.2 / 1          any version with that prefix (>=1.2.0 <1.3.0, >=1.0.0 <2.0.0)
    ^1.2.3           >=1.2.3 <2.0.0   (^0.2.3: <0.3.0, ^0.0.3: <0.0.4: the left-most non-zero part is fixed)
    ~1.2.3 / ~1.2    >=1.2.3 <1.3.0   (~1: <2.0.0)
    >=1,<2           comparators (>, >=, <, <=, =) joined by commas or spaces, all must hold
    latest           the highest version that is not a prerelease (the highest prerelease if there are only those)

As with npm, a range matches prereleases only when one of its comparators names a prerelease itself. As with
PEP 592, a yanked version is skipped by every range and `latest`; only an exact version (`1.2.3`, `=1.2.3`)
resolves to it.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING

from lightning_peft.errors import ConfigError
from lightning_peft.options import BUMP_PARTS

if TYPE_CHECKING:
    from semver import Version

TAG_PREFIX = "v"
_COMPARATOR = re.compile(r"^(>=|<=|>|<|=|\^|~)?\s*v?(\d+(?:\.\d+){0,2}(?:-[0-9A-Za-z.-]+)?)$")


def parse_version(text: str, *, field: str = "--version") -> Version:
    """A strict `X.Y.Z` (optionally `-prerelease`) version; build metadata is refused, as it does not order."""
    from semver import Version

    value = str(text).strip().removeprefix(TAG_PREFIX)
    try:
        version = Version.parse(value)
    except (ValueError, TypeError):
        raise ConfigError(
            f"`{field}`={text!r} is not a semantic version; use MAJOR.MINOR.PATCH such as 1.0.0 or 1.2.0-rc.1."
        ) from None
    if version.build:
        raise ConfigError(
            f"`{field}`={text!r} has build metadata (+{version.build}), which semver ignores when ordering; "
            "drop it or use a prerelease such as 1.0.0-rc.1."
        )
    return version


def tag_for(version: Version | str) -> str:
    """The git tag of a version on the Hub: `v1.2.3`."""
    return f"{TAG_PREFIX}{version}"


def version_of_tag(tag: str) -> Version | None:
    """The version a `vX.Y.Z` tag names, or None for any other tag."""
    if not tag.startswith(TAG_PREFIX):
        return None
    try:
        return parse_version(tag)
    except ConfigError:
        return None


def latest(versions: Iterable[Version]) -> Version | None:
    """The highest release, or the highest prerelease when nothing else is published; None when empty."""
    versions = sorted(versions)
    releases = [v for v in versions if not v.prerelease]
    return (releases or versions or [None])[-1]


def next_version(published: Iterable[Version], *, version: str | None = None, bump: str | None = None) -> Version:
    """The version a publish creates: `version` as given, or `bump` applied to the latest published one.

    Without either, the first version of a repo is 1.0.0; later versions must be chosen explicitly.

    Raises:
        ConfigError: both or an invalid value given, no choice made for a repo that has versions, or a
            version that is already published (published versions are immutable).
    """
    published = sorted(published)
    if version is not None and bump is not None:
        raise ConfigError("Give either `--version` or `--bump`, not both.")
    current = latest(published)
    if version is not None:
        chosen = parse_version(version)
    elif bump is not None:
        chosen = _bumped(current, bump)
    elif current is None:
        chosen = parse_version("1.0.0")
    else:
        raise ConfigError(
            f"This repo already has versions (latest {current}); choose the next one with `--version X.Y.Z` "
            "or `--bump major|minor|patch`."
        )
    if chosen in published:
        raise ConfigError(
            f"Version {chosen} is already published and published versions are immutable; "
            f"publish a new one (e.g. `--bump patch` gives {_bumped(current, 'patch')})."
        )
    return chosen


def _bumped(current: Version | None, part: str) -> Version:
    from semver import Version

    if part not in BUMP_PARTS:
        raise ConfigError(f"`--bump`={part!r} is not one of: {', '.join(BUMP_PARTS)}.")
    base = current.finalize_version() if current is not None and current.prerelease else current
    if base is None:
        base = Version(0, 0, 0)
    elif current is not None and current.prerelease and part == "patch":
        return base  # 1.0.1-rc.1 bumped by a patch is its release, 1.0.1, as npm does
    return getattr(base, f"bump_{part}")()


def parent_of(version: Version, published: Iterable[Version]) -> Version | None:
    """The highest published version below `version`: what this one was built to follow."""
    older = [v for v in published if v < version]
    return max(older) if older else None


def resolve(spec: str, published: Iterable[Version], yanked: Collection[Version] = ()) -> Version:
    """The highest published version that satisfies `spec` (see the module docstring for the syntax).

    Versions in `yanked` are candidates only for an exact spec (PEP 592).

    Raises:
        ConfigError: an invalid spec, or no published version satisfies it.
    """
    published = sorted(published)
    spec = spec.strip() or "latest"
    if not published:
        raise ConfigError("No version is published yet; publish one with `lpeft publish` first.")
    if spec == "latest":
        found = latest(v for v in published if v not in yanked)
    else:
        comparators = parse_range(spec)
        allow_pre = any(v.prerelease for _, v in comparators)
        exact = len(comparators) == 1 and comparators[0][0] == "="
        candidates = [v for v in published if exact or v not in yanked]
        matching = [v for v in candidates if (allow_pre or not v.prerelease) and _satisfies(v, comparators)]
        found = matching[-1] if matching else None
    if found is None:
        shown = ", ".join(f"{v} (yanked)" if v in yanked else str(v) for v in published)
        raise ConfigError(f"No published version satisfies {spec!r}; published: {shown}.")
    return found


def check_spec(spec: str) -> str:
    """`spec` (stripped; empty means `latest`) once it is `latest` or a well-formed range.

    Checked before any registry lookup, so a typo such as `^^1` is reported as such, not as a missing repo.

    Raises:
        ConfigError: `spec` is malformed; the message lists the accepted forms.
    """
    spec = spec.strip() or "latest"
    if spec != "latest":
        parse_range(spec)
    return spec


def parse_range(spec: str) -> list[tuple[str, Version]]:
    """Turn a range into (operator, version) comparators that must all hold."""
    parts = [p for p in re.split(r"[,\s]+", re.sub(r"(>=|<=|>|<|=|\^|~)\s+", r"\1", spec.strip())) if p]
    if not parts:
        raise ConfigError(f"Version spec {spec!r} is empty; use e.g. 1.2.3, ^1.2, ~1.2, >=1,<2 or latest.")
    comparators: list[tuple[str, Version]] = []
    for part in parts:
        comparators.extend(_expand(part, spec))
    return comparators


def _expand(part: str, spec: str) -> list[tuple[str, Version]]:
    from semver import Version

    match = _COMPARATOR.match(part)
    if match is None:
        raise ConfigError(
            f"Version spec {spec!r} is malformed ({part!r}); use 1.2.3, 1.2, ^1.2, ~1.2, >=1,<2 or latest."
        )
    operator, text = match.group(1) or "=", match.group(2)
    core, _, prerelease = text.partition("-")
    numbers = [int(n) for n in core.split(".")]
    if prerelease and len(numbers) < 3:
        raise ConfigError(f"Version spec {spec!r}: a prerelease needs a full version, as in 1.2.3-{prerelease}.")
    low = Version(*[*numbers, 0, 0][:3], prerelease=prerelease or None)
    upper = _upper_bound(numbers, operator)
    if operator in ("^", "~") or (operator == "=" and len(numbers) < 3):
        return [(">=", low), ("<", upper)]
    if len(numbers) < 3 and operator == ">":
        return [(">=", upper)]  # >1.2 means above every 1.2.x
    if len(numbers) < 3 and operator == "<=":
        return [("<", upper)]  # <=1.2 includes every 1.2.x
    return [(operator, low)]


def _upper_bound(numbers: list[int], operator: str) -> Version:
    """The first version outside `numbers` read as a prefix (or as a caret range for `^`)."""
    from semver import Version

    if operator == "^":
        fixed = next((i for i, n in enumerate(numbers) if n != 0), len(numbers) - 1)
        fixed = min(fixed, len(numbers) - 1)
    elif operator == "~":
        fixed = min(1, len(numbers) - 1)
    else:
        fixed = len(numbers) - 1
    head = [*numbers[:fixed], numbers[fixed] + 1]
    return Version(*[*head, 0, 0, 0][:3])


def _satisfies(version: Version, comparators: list[tuple[str, Version]]) -> bool:
    checks = {
        "=": lambda c: c == 0,
        ">": lambda c: c > 0,
        ">=": lambda c: c >= 0,
        "<": lambda c: c < 0,
        "<=": lambda c: c <= 0,
    }
    return all(checks[op](version.compare(bound)) for op, bound in comparators)
