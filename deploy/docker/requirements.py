"""Print the project's requirements from pyproject.toml, one a line: its dependencies plus those of the extras
named on the command line. The images install these before they copy the source, so that a code change
rebuilds only the small layer that installs the project itself (pip install --no-deps .), not TensorFlow.

    usage: python requirements.py PYPROJECT [EXTRA ...]
"""
from __future__ import annotations

import sys
import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as file:
        project = tomllib.load(file)["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(f"requirements.py: no extra {', '.join(unknown)} in {pyproject} "
                         f"(it has: {', '.join(sorted(optional))})")
    return project.get("dependencies", []) + [r for extra in extras for r in optional[extra]]


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python requirements.py PYPROJECT [EXTRA ...]")
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))
