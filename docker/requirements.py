"""Print the requirements of pyproject.toml, one a line: the dependencies plus the extras named.

Used by the Dockerfiles, so that the dependencies install in a layer of their own that is
rebuilt only when pyproject.toml changes (not on every change to the source):

    python3 docker/requirements.py pyproject.toml                       # the agent
    python3 docker/requirements.py pyproject.toml controller,postgres   # the controller
"""

import sys
import tomllib


def main(path: str, extras: str = "") -> None:
    with open(path, "rb") as f:
        project = tomllib.load(f)["project"]
    requirements = list(project["dependencies"])
    for extra in filter(None, (e.strip() for e in extras.split(","))):
        requirements += project["optional-dependencies"][extra]
    print("\n".join(r for r in requirements if not r.startswith(project["name"] + "[")))


if __name__ == "__main__":
    main(*sys.argv[1:])
