"""Print the runtime requirements of pyproject.toml, one a line, for `pip install -r`.

The image installs them in a layer of their own, which code changes leave cached.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib


def requirements(pyproject: Path) -> list[str]:
    with pyproject.open("rb") as file:
        project = tomllib.load(file)["project"]
    dependencies: list[str] = project["dependencies"]
    return dependencies


if __name__ == "__main__":
    print("\n".join(requirements(Path(sys.argv[1]))))
