"""Print dypo's dependencies (plus the named extras) from pyproject.toml, one requirement per line.

The images install these in their own layer before copying the source, so editing code does not reinstall torch.
Usage: python3 pyproject_deps.py pyproject.toml [EXTRA,EXTRA...]
"""

import sys
import tomllib


def main(pyproject: str, extras: str = "") -> None:
    with open(pyproject, "rb") as file:
        project = tomllib.load(file)["project"]
    requirements = list(project["dependencies"])
    for extra in filter(None, extras.split(",")):
        if extra not in project["optional-dependencies"]:
            sys.exit(f"unknown extra {extra!r}; pyproject.toml defines {', '.join(project['optional-dependencies'])}")
        requirements += project["optional-dependencies"][extra]
    print("\n".join(requirements))


if __name__ == "__main__":
    main(*sys.argv[1:])
