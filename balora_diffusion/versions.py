"""The installed libraries against what balora-diffusion needs and what is known to break together.

Every `balora` command checks this first, so a bad combination stops with one line naming the
versions and the fix instead of a traceback from deep inside a library. Two sources:
- KNOWN_BROKEN: releases that install side by side but fail at run time; a version range on one
  package cannot say "only with that release of another", so these are listed here;
- this distribution's own requirement ranges (pyproject.toml), read from its installed metadata,
  for an environment that pip was told to ignore (`--no-deps`, a later manual upgrade).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

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


# --- the drift report of `make test-latest` --------------------------------------------------

def read_lock(path: Path) -> dict[str, str]:
    """name -> version of a `pip freeze` file; local version tags (+cpu) dropped."""
    pins = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = version.split("+")[0].strip()
    return pins


def changed_since_lock(locked: dict[str, str], installed: dict[str, str]) -> list[str]:
    """'name: locked -> installed' for every package whose version differs ('-' = absent)."""
    return [f"{name}: {locked.get(name, '-')} -> {installed.get(name, '-')}"
            for name in sorted(set(locked) | set(installed)) if locked.get(name) != installed.get(name)]


def installed_distributions() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version.split("+")[0]
            for d in metadata.distributions() if d.metadata["Name"] and canonicalize_name(d.metadata["Name"]) != DISTRIBUTION}


def newest_release(name: str) -> str | None:
    """The newest release on the configured index (`pip index versions`), None when unreachable."""
    result = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "--json", name],
                            capture_output=True, text=True)
    return json.loads(result.stdout)["latest"] if result.returncode == 0 else None


def held_back(requirements: Iterable[Requirement], newest: Callable[[str], str | None] = newest_release) -> list[str]:
    """Requirements whose newest release lies outside their range: an upper bound or exclusion
    that a fixed release may let us lift."""
    lines = []
    for req in requirements:
        if not any(spec.operator in ("<", "<=", "!=", "==", "~=") for spec in req.specifier):
            continue
        latest = newest(req.name)
        if latest is not None and not req.specifier.contains(latest, prereleases=True):
            lines.append(f"{req.name} {latest} (pyproject: {req})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m balora_diffusion.versions",
                                     description="This environment against the lock of tested versions.")
    parser.add_argument("--lock", type=Path, required=True, help="the lock file (a pip freeze)")
    args = parser.parse_args(argv)
    sections = {
        f"releases that differ from {args.lock} (locked -> installed)":
            changed_since_lock(read_lock(args.lock), installed_distributions()),
        "newest releases outside pyproject's ranges (not installed)": held_back(own_requirements()),
        "known-broken combinations and ranges": problems(),
    }
    for title, lines in sections.items():
        print(title + ":")
        print("\n".join(f"  {line}" for line in lines) if lines else "  (none)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
