"""Print pyproject.toml's pinned dependencies, one per line, leaving out the names given.

Used by the Dockerfile to install our pins on top of a base image whose torch (and TE) we keep:
    python scripts/pinned_deps.py torch | xargs pip install
"""
import sys
import tomllib
from pathlib import Path

skip = {name.lower() for name in sys.argv[1:]}
deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
for dep in deps:
    name = dep.split("=")[0].split(">")[0].split("<")[0].split("[")[0].strip().lower()
    if name not in skip:
        print(dep)
