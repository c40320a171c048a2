"""Print the requirements of the project's base dependencies plus the given extras, read from pyproject.toml.

Used by the Dockerfiles to install the dependencies in a layer of their own, before the source is copied,
so that a code change does not re-download them:  python docker/requirements.py pyproject.toml serve,gpu

With the `gpu` extra, the CPU builds it replaces (onnxruntime, faiss-cpu) are left out: onnxruntime and
onnxruntime-gpu install the same `onnxruntime` package, so having both breaks whichever came first.
"""

from __future__ import annotations

import re
import sys
import tomllib

REPLACED_BY_GPU = {"onnxruntime", "faiss-cpu"}


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    if match is None:
        raise SystemExit(f"cannot read a package name from requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def requirements(pyproject: str, extras: str) -> list[str]:
    with open(pyproject, "rb") as handle:
        project = tomllib.load(handle)["project"]
    optional = project.get("optional-dependencies", {})
    wanted = [name.strip() for name in extras.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in optional]
    if unknown:
        raise SystemExit(f"{pyproject}: no extra named {', '.join(unknown)} (known: {', '.join(sorted(optional))})")
    lines = list(project.get("dependencies", []))
    for name in wanted:
        lines += [line for line in optional[name] if line not in lines]
    if "gpu" in wanted:
        lines = [line for line in lines if _name(line) not in REPLACED_BY_GPU]
    return lines


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")))
