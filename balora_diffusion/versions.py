"""The installed libraries against what balora-diffusion needs and what is known to break together.

Every `balora` command checks this first, so a bad combination stops with one line naming the
versions and the fix instead of a traceback from deep inside a library. Two sources:
- KNOWN_BROKEN: releases that install side by side but fail at run time; a version range on one
  package cannot say "only with that release of another", so these are listed here;
- this distribution's own requirement ranges (pyproject.toml), read from its installed metadata,
  for an environment that pip was told to ignore (`--no-deps`, a later manual upgrade).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from balora_diffusion.errors import UserError

DISTRIBUTION = "balora-diffusion"
VersionOf = Callable[[str], "str | None"]


@dataclass(frozen=True)
class Conflict:
    """`package` at `versions` fails at run time unless `needs` is at `needs_versions`."""
    package: str
    versions: str
    needs: str
    needs_versions: str
    fix: str

    def check(self, version_of: VersionOf) -> str | None:
        have = version_of(self.package)
        if have is None or not SpecifierSet(self.versions).contains(have, prereleases=True):
            return None
        other = version_of(self.needs)
        if other is not None and SpecifierSet(self.needs_versions).contains(other, prereleases=True):
            return None
        installed = f"{self.needs} {other} is installed" if other else f"{self.needs} is not installed"
        return f"{self.package} {have} needs {self.needs} {self.needs_versions}, but {installed}: {self.fix}"


KNOWN_BROKEN = (
    # transformers' add_adapter refuses peft older than 0.22 from 5.24 on (the text-encoder LoRA).
    Conflict("transformers", ">=5.24", "peft", ">=0.22", "pip install 'transformers<5.24'"),
)


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def own_requirements() -> list[Requirement]:
    """The run-time requirements of the installed balora-diffusion (none when run from a bare source tree)."""
    try:
        listed = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []
    reqs = [Requirement(text) for text in listed]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def problems(version_of: VersionOf = installed_version,
             requirements: Iterable[Requirement] | None = None) -> list[str]:
    """One line per problem, the known-broken combinations first (their fix is the precise one)."""
    found = [line for conflict in KNOWN_BROKEN if (line := conflict.check(version_of))]
    for req in own_requirements() if requirements is None else requirements:
        have = version_of(req.name)
        if have is None:
            found.append(f"{req.name} is not installed: pip install '{req}'")
        elif not req.specifier.contains(have, prereleases=True):
            found.append(f"{req.name} {have} is installed, balora-diffusion needs {req}: pip install '{req}'")
    return found


def check_versions() -> None:
    found = problems()
    if found:
        raise UserError(found[0])
