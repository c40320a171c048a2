"""The lock files of every install path, requirements/*.txt: each package pinned to one version with the sha256
of every file PyPI has for it, resolved by uv for Linux x86_64 and CPython 3.11 (this machine, CI and the
python:3.11-slim images) against PyPI.

    make lock                                   # regenerate them all: a pin moves only when pyproject.toml
                                                # or requirements/*.in no longer allow it
    make lock LOCK_ARGS=--upgrade               # every pin to the newest version allowed
    make lock LOCK_ARGS='--upgrade-package fastapi'
    make lock-check                             # exit 1 if `make lock` would change a file (asks PyPI)
    python scripts/lock.py --verify             # offline: every lock pins what pyproject.toml asks for
                                                # (`make setup` runs it)

| lock                  | installed by                                  | what                                        |
|-----------------------|-----------------------------------------------|---------------------------------------------|
| dev.txt               | `make setup` (so `make test`, `.ci/run`)      | core + train + serve + dev + openvino +     |
|                       |                                               | milvus + cluster, the torch pair            |
| serve.txt             | docker/Dockerfile.serve (EXTRAS=serve)        | core + serve, no torch                      |
| serve-gpu.txt         | docker/Dockerfile.serve (EXTRAS=serve,gpu)    | core + serve + gpu, less onnxruntime and    |
|                       |                                               | faiss-cpu (the GPU builds replace them)     |
| train-torch.txt       | docker/Dockerfile.train, the torch layer      | the torch pair and PyPI's CUDA libraries    |
| train.txt             | docker/Dockerfile.train, after train-torch    | core + train, less train-torch.txt          |

Every lock also pins the build backend (requirements/build.in): the project itself is installed with
`pip install --no-deps --no-build-isolation`. dev.txt is resolved first and the others are constrained to
it, so a package has the same version in every lock (the images run what `make test` tested); only the
`gpu` packages, which dev.txt lacks, are resolved on their own.

train-torch.txt holds torch, torchvision and the packages only PyPI's CUDA build of torch needs (triton,
nvidia-*, cuda-*); train.txt everything else, torch's own pure-Python dependencies included. The training
image can thus take torch from another index (TORCH_INDEX_URL, e.g. the CPU wheels) and still install
every other package from the hashed train.txt.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = "requirements"
INDEX = "https://pypi.org/simple"
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-manylinux_2_28"  # torch's wheel tag; python:3.11-slim (Debian 12) has glibc 2.36
# The environment the locks are for, for evaluating markers in --verify.
MARKER_ENVIRONMENT = {
    "python_version": PYTHON_VERSION,
    "python_full_version": f"{PYTHON_VERSION}.0",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}
# Packages of the torch layer (train-torch.txt): the pair and what only the CUDA build of torch needs.
TORCH_PAIR = {"torch", "torchvision"}
TORCH_LAYER = re.compile(r"^(torch|torchvision|triton|nvidia-.+|cuda-.+)$")


@dataclass(frozen=True)
class Lock:
    name: str  # the file under requirements/
    extras: tuple[str, ...]  # of pyproject.toml, besides its core dependencies
    inputs: tuple[str, ...]  # requirements/*.in
    purpose: str  # the comment under uv's header
    excludes: tuple[str, ...] = ()  # left out of the resolution altogether
    constrained: bool = True  # to dev.txt


DEV = Lock(
    "dev.txt", ("train", "serve", "dev", "openvino", "milvus", "cluster"), ("torch.in", "build.in"),
    "`make setup` (and so `make test`, .ci/run): core + train + serve + dev + openvino + milvus + cluster,\n"
    "the torch pair.\n"
    "pip install --require-hashes -r requirements/dev.txt && pip install --no-deps --no-build-isolation -e .",
    constrained=False,
)
SERVE = Lock(
    "serve.txt", ("serve",), ("build.in",),
    "docker/Dockerfile.serve (EXTRAS=serve): core + serve extra; no torch.",
)
SERVE_GPU = Lock(
    "serve-gpu.txt", ("serve", "gpu"), ("build.in",),
    "docker/Dockerfile.serve (EXTRAS=serve,gpu): core + serve + gpu extras, without onnxruntime and faiss-cpu\n"
    "(onnxruntime-gpu and faiss-gpu replace them: the two onnxruntime builds install the same package).",
    excludes=("onnxruntime", "faiss-cpu"),
)
# Resolved as one, written as two files (train-torch.txt, train.txt).
TRAIN = Lock("train-full.txt", ("train",), ("torch.in", "build.in"), "")
TRAIN_TORCH_PURPOSE = (
    "docker/Dockerfile.train, the torch layer: the torch pair and the packages only PyPI's CUDA build of\n"
    "torch needs. Install with --no-deps (torch's other dependencies are in train.txt), then train.txt."
)
TRAIN_REST_PURPOSE = (
    "docker/Dockerfile.train: core + train extra, less the torch layer (train-torch.txt, installed first;\n"
    "or the same torch pair from TORCH_INDEX_URL)."
)
OUTPUTS = (DEV.name, SERVE.name, SERVE_GPU.name, "train-torch.txt", "train.txt")
# uv's own settings from the environment that would change what it resolves or from where.
UV_KEEP = {"UV_CACHE_DIR", "UV_NATIVE_TLS", "UV_HTTP_TIMEOUT", "UV_CONCURRENT_DOWNLOADS", "UV_NO_PROGRESS"}

REQUIREMENT_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- reading a lock -------------------------------------------------------------------------------------------


def split_blocks(text: str) -> tuple[list[str], list[list[str]]]:
    """uv's output as (header lines, one block of lines per pinned package)."""
    header: list[str] = []
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if REQUIREMENT_LINE.match(line):
            blocks.append([line])
        elif blocks and line.startswith((" ", "\t")):
            blocks[-1].append(line)
        elif not blocks:
            header.append(line)
        elif line.strip():
            raise SystemExit(f"cannot read this line of a lock after its first requirement: {line!r}")
    return header, blocks


def block_name(block: list[str]) -> str:
    match = REQUIREMENT_LINE.match(block[0])
    assert match is not None
    return canonical(match.group(1))


def block_parents(block: list[str]) -> set[str]:
    """The packages and files a block says it is there for (`# via a, b, -r requirements/x.in`)."""
    parents: set[str] = set()
    for line in block:
        stripped = line.strip()
        if stripped.startswith("# via"):
            parents |= {part.strip() for part in stripped[len("# via"):].split(",") if part.strip()}
    return parents


def read_pins(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) of a lock file."""
    return read_pins_text(path.read_text())


def read_pins_text(text: str) -> dict[str, tuple[str, int]]:
    _, blocks = split_blocks(text)
    pins: dict[str, tuple[str, int]] = {}
    for block in blocks:
        match = REQUIREMENT_LINE.match(block[0])
        assert match is not None
        pins[canonical(match.group(1))] = (match.group(2), sum(line.count("--hash=") for line in block))
    return pins


# --- making the locks -----------------------------------------------------------------------------------------


def uv_environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("UV_") or key in UV_KEEP}


def compile_lock(uv: str, work: Path, lock: Lock, output: str, extra_args: list[str]) -> str:
    command = [
        uv, "pip", "compile", "--quiet", "--no-config",
        "--default-index", INDEX,
        "--python-version", PYTHON_VERSION, "--python-platform", PLATFORM,
        "--generate-hashes", "--annotation-style", "line", "--custom-compile-command", "make lock",
        "pyproject.toml", *[f"{REQUIREMENTS}/{name}" for name in lock.inputs],
        *[arg for extra in lock.extras for arg in ("--extra", extra)],
        "--output-file", f"{REQUIREMENTS}/{output}",
    ]
    if lock.constrained:
        command += ["--constraint", f"{REQUIREMENTS}/{DEV.name}"]
    if lock.excludes:
        excludes = work / f"{output}.excludes"
        excludes.write_text("\n".join(lock.excludes) + "\n")
        command += ["--excludes", str(excludes)]
    command += extra_args
    print(f"lock: {REQUIREMENTS}/{output}", file=sys.stderr)
    result = subprocess.run(command, cwd=work, env=uv_environment())
    if result.returncode != 0:
        raise SystemExit(f"uv pip compile failed for {REQUIREMENTS}/{output} (exit {result.returncode})")
    return (work / REQUIREMENTS / output).read_text()


def with_purpose(header: list[str], blocks: list[list[str]], purpose: str) -> str:
    lines = [*header[:2], *[f"# {line}" for line in purpose.splitlines()]]
    for block in blocks:
        lines += block
    return "\n".join(lines) + "\n"


def split_train(text: str) -> tuple[str, str]:
    """The full train resolution as (train-torch.txt, train.txt)."""
    header, blocks = split_blocks(text)
    torch_layer = [block for block in blocks if TORCH_LAYER.match(block_name(block))]
    rest = [block for block in blocks if not TORCH_LAYER.match(block_name(block))]
    layer_names = {block_name(block) for block in torch_layer}
    missing = TORCH_PAIR - layer_names
    if missing:
        raise SystemExit(f"the train resolution lacks {', '.join(sorted(missing))}: see {REQUIREMENTS}/torch.in")
    # A package of the torch layer that something else needs would be missing where torch comes from
    # another index (TORCH_INDEX_URL): refuse rather than write such a split.
    for block in torch_layer:
        name = block_name(block)
        if name in TORCH_PAIR:
            continue
        others = {parent for parent in block_parents(block)
                  if not parent.startswith(("-c ", "-r ")) and canonical(parent) not in layer_names}
        if others:
            raise SystemExit(f"{name} belongs to the torch layer by its name but is also needed by "
                             f"{', '.join(sorted(others))}: extend TORCH_LAYER in {Path(__file__).name}")
    return (with_purpose(header, torch_layer, TRAIN_TORCH_PURPOSE), with_purpose(header, rest, TRAIN_REST_PURPOSE))


def make_locks(uv: str, extra_args: list[str]) -> dict[str, str]:
    """Every lock's text, made in a scratch copy of pyproject.toml and requirements/ (the existing locks are
    uv's preferred versions there, so pins stay unless something forces them to move)."""
    with tempfile.TemporaryDirectory(prefix="retina-lock.") as scratch:
        work = Path(scratch)
        shutil.copy2(ROOT / "pyproject.toml", work / "pyproject.toml")
        shutil.copytree(ROOT / REQUIREMENTS, work / REQUIREMENTS)
        texts: dict[str, str] = {}
        for lock in (DEV, SERVE, SERVE_GPU):
            header, blocks = split_blocks(compile_lock(uv, work, lock, lock.name, extra_args))
            texts[lock.name] = with_purpose(header, blocks, lock.purpose)
            (work / REQUIREMENTS / lock.name).write_text(texts[lock.name])
        texts["train-torch.txt"], texts["train.txt"] = split_train(
            compile_lock(uv, work, TRAIN, TRAIN.name, extra_args))
        return texts


# --- checking the locks against pyproject.toml, offline -------------------------------------------------------


def wanted(project: dict, lock: Lock) -> list[str]:
    optional = project.get("optional-dependencies", {})
    lines = list(project.get("dependencies", []))
    for extra in lock.extras:
        lines += optional[extra]
    for name in lock.inputs:
        for line in (ROOT / REQUIREMENTS / name).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                lines.append(line)
    return lines


def verify() -> list[str]:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip always brings a copy
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]

    with open(ROOT / "pyproject.toml", "rb") as handle:
        project = tomllib.load(handle)["project"]
    problems: list[str] = []
    for name in OUTPUTS:
        if not (ROOT / REQUIREMENTS / name).is_file():
            problems.append(f"{REQUIREMENTS}/{name} is missing")
    if problems:
        return problems
    files = {name: read_pins(ROOT / REQUIREMENTS / name) for name in OUTPUTS}
    for name, pins in files.items():
        for package, (_, hashes) in pins.items():
            if hashes == 0:
                problems.append(f"{REQUIREMENTS}/{name}: {package} has no --hash")
    train = {**files["train-torch.txt"], **files["train.txt"]}
    checks = ((DEV, files[DEV.name], DEV.name), (SERVE, files[SERVE.name], SERVE.name),
              (SERVE_GPU, files[SERVE_GPU.name], SERVE_GPU.name), (TRAIN, train, "train-torch.txt + train.txt"))
    for lock, pins, label in checks:
        for line in wanted(project, lock):
            requirement = Requirement(line)
            package = canonical(requirement.name)
            if package in lock.excludes:
                continue
            if requirement.marker is not None and not requirement.marker.evaluate(MARKER_ENVIRONMENT):
                continue
            if package not in pins:
                problems.append(f"{REQUIREMENTS}/{label}: {requirement} is not pinned")
            elif not requirement.specifier.contains(pins[package][0], prereleases=True):
                problems.append(f"{REQUIREMENTS}/{label}: {package}=={pins[package][0]} does not satisfy {requirement}")
        for package in lock.excludes:
            if package in pins:
                problems.append(f"{REQUIREMENTS}/{label}: {package} must not be there (replaced by the gpu extra)")
    for name in (SERVE.name, SERVE_GPU.name):
        for package in TORCH_PAIR & files[name].keys():
            problems.append(f"{REQUIREMENTS}/{name}: {package} must not be in the serving image")
    for package in files["train-torch.txt"]:
        if not TORCH_LAYER.match(package):
            problems.append(f"{REQUIREMENTS}/train-torch.txt: {package} belongs in train.txt")
    for package in files["train.txt"]:
        if TORCH_LAYER.match(package):
            problems.append(f"{REQUIREMENTS}/train.txt: {package} belongs in train-torch.txt")
    return problems


def describe_change(old: str, new: str, limit: int = 40) -> list[str]:
    """What `make lock` would change in one file: pins added, removed or moved, else the other lines."""
    before, after = read_pins_text(old), read_pins_text(new)
    lines = [f"+ {name}=={after[name][0]}" for name in sorted(after.keys() - before.keys())]
    lines += [f"- {name}=={before[name][0]}" for name in sorted(before.keys() - after.keys())]
    lines += [f"~ {name}: {before[name][0]} -> {after[name][0]}" for name in sorted(before.keys() & after.keys())
              if before[name][0] != after[name][0]]
    if not lines:  # same pins: hashes (a file added to a release), annotations or the header
        lines = [line for line in difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="", n=0)
                 if not line.startswith(("---", "+++", "@@"))]
    return lines[:limit] + ([f"... {len(lines) - limit} more"] if len(lines) > limit else [])


# --- command line ---------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uv", default="uv", help="the uv executable (`make lock` installs its pinned version)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if the locks would change (resolves on PyPI)")
    mode.add_argument("--verify", action="store_true", help="offline: the locks pin what pyproject.toml asks for")
    args, extra = parser.parse_known_args(argv)

    if args.verify:
        problems = verify()
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print(f"{len(problems)} problem(s): the lock files do not match pyproject.toml / {REQUIREMENTS}/*.in; "
                  "run `make lock`", file=sys.stderr)
            return 1
        print(f"lock files consistent with pyproject.toml: {', '.join(OUTPUTS)}")
        return 0

    uv = shutil.which(args.uv)  # uv runs in a scratch folder: a relative path must be resolved here
    if uv is None:
        raise SystemExit(f"no uv at {args.uv!r}: `make lock` installs the pinned one (Makefile's UV_VERSION)")
    texts = make_locks(str(Path(uv).resolve()), extra)
    stale = [name for name in OUTPUTS
             if not (ROOT / REQUIREMENTS / name).is_file() or (ROOT / REQUIREMENTS / name).read_text() != texts[name]]
    if args.check:
        for name in stale:
            path = ROOT / REQUIREMENTS / name
            print(f"{REQUIREMENTS}/{name}:")
            print("\n".join(f"  {line}" for line in describe_change(path.read_text() if path.is_file() else "",
                                                                   texts[name])))
        if stale:
            print(f"out of date: {', '.join(stale)}; run `make lock`", file=sys.stderr)
            return 1
        print(f"lock files up to date: {', '.join(OUTPUTS)}")
        return 0
    for name in stale:
        (ROOT / REQUIREMENTS / name).write_text(texts[name])
    print(f"written: {', '.join(stale)}" if stale else "lock files already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
