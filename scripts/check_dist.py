"""List a prism-ext wheel or sdist and fail on any file that should not ship.

    python scripts/check_dist.py dist/prism_ext-0.1.0-cp311-cp311-linux_x86_64.whl
    python scripts/check_dist.py dist/prism_ext-0.1.0.tar.gz

The wheel is checked against an allow-list: the Python package, exactly one
compiled extension ``prism_ext/_C.<suffix>`` and the metadata. The sdist must
hold what a build needs and no build leftovers (it may carry the tests, which
is where distributors look for them).
"""

from __future__ import annotations

import re
import sys
import tarfile
import zipfile
from pathlib import PurePosixPath

# Data files the package may ship (bundled configs, tokenizer files, weights).
DATA_SUFFIXES = {".json", ".safetensors", ".txt", ".model", ".npz"}  # .npz: bundled held-out digits
# Directory names that mark tests, benches or build trees anywhere in a path.
FORBIDDEN_DIRS = {"tests", "test", "bench", "benches", "build", "CMakeFiles", "__pycache__", ".pytest_cache", ".hypothesis"}
FORBIDDEN_SUFFIXES = {".pyc", ".o", ".a", ".obj", ".cpp", ".cc", ".h", ".inc", ".cmake", ".ninja", ".log"}
EXTENSION = re.compile(r"^prism_ext/_C(\.[A-Za-z0-9_-]+)*\.(so|pyd)$")
SDIST_REQUIRED = ("pyproject.toml", "CMakeLists.txt", "PKG-INFO", "csrc/bindings.cpp", "prism_ext/__init__.py")
SDIST_FORBIDDEN_TOP = {"build", "dist", ".venv", ".git", ".ci", ".hypothesis", ".pytest_cache"}


def wheel_problems(names: list[str]) -> list[str]:
    problems = []
    extensions = [n for n in names if EXTENSION.match(n)]
    if len(extensions) != 1:
        problems.append(f"expected exactly one compiled extension prism_ext/_C.*, found {extensions or 'none'}")
    for name in names:
        path = PurePosixPath(name)
        top = path.parts[0]
        if top.endswith(".dist-info") and top.startswith("prism_ext-"):
            continue
        if top != "prism_ext":
            problems.append(f"{name}: outside the prism_ext package")
        elif FORBIDDEN_DIRS.intersection(path.parts[:-1]) or path.name.startswith(("test_", "conftest")):
            problems.append(f"{name}: test, bench or build file")
        elif path.suffix in FORBIDDEN_SUFFIXES:
            problems.append(f"{name}: source or build leftover")
        elif not (name in extensions or path.suffix in {".py", ".pyi"} or path.name == "py.typed" or path.suffix in DATA_SUFFIXES):
            problems.append(f"{name}: unexpected file type")
    return problems


def sdist_problems(names: list[str]) -> list[str]:
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1:
        return [f"expected one top-level folder, found {sorted(roots)}"]
    root = roots.pop()
    rel = [n.split("/", 1)[1] for n in names if "/" in n]
    problems = [f"missing {r}" for r in SDIST_REQUIRED if r not in rel]
    for name in rel:
        path = PurePosixPath(name)
        if path.parts[0] in SDIST_FORBIDDEN_TOP:
            problems.append(f"{root}/{name}: build leftover or local state")
        elif path.suffix in {".so", ".pyd", ".o", ".a", ".pyc", ".whl"} or "__pycache__" in path.parts:
            problems.append(f"{root}/{name}: compiled leftover")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    dist = argv[0]
    if dist.endswith(".whl"):
        with zipfile.ZipFile(dist) as zf:
            entries = [(i.filename, i.file_size) for i in zf.infolist() if not i.is_dir()]
        problems = wheel_problems([n for n, _ in entries])
    elif dist.endswith(".tar.gz"):
        with tarfile.open(dist) as tf:
            entries = [(m.name, m.size) for m in tf.getmembers() if m.isfile()]
        problems = sdist_problems([n for n, _ in entries])
    else:
        print(f"dist: expected a .whl or .tar.gz, got {dist}", file=sys.stderr)
        return 2
    for name, size in sorted(entries):
        print(f"  {size:>10}  {name}")
    print(f"  {sum(s for _, s in entries):>10}  ({len(entries)} files, uncompressed)")
    for p in problems:
        print(f"check_dist: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
