"""Print pyproject.toml's lower bounds as exact pins (``name>=X`` -> ``name==X``), for `make test-oldest`.

Used as a pip constraints file: every direct dependency (and the test extra) at the oldest version
pyproject.toml claims to support, everything else resolved by pip as usual. That is what makes
the lower bounds tested claims rather than guesses.
"""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement


def lower_bound_pins(pyproject: Path, extras: tuple[str, ...] = ("test",)) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    pins = {}
    for req in map(Requirement, reqs):
        lows = [s.version for s in req.specifier if s.operator == ">="]
        if not lows:
            raise SystemExit(f"{req}: no lower bound in pyproject.toml; give every dependency one")
        pins[req.name] = f"{req.name}=={lows[0]}"
    return list(pins.values())


if __name__ == "__main__":
    print("\n".join(lower_bound_pins(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("pyproject.toml"))))
