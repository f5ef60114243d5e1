"""Imports point one way (docs/design.md, "Import direction"): every module of
the package imports only modules of its own group or of a lower layer. A new
import that points up (or sideways, between two groups of one layer) fails
here, naming the module, the import and the rule."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import prism_ext

ROOT = Path(prism_ext.__file__).resolve().parent

# Lowest first. A group is a subpackage, or a top-level module.
LAYERS = [
    {"_version", "_C", "checks", "util", "zoo", "comm", "inputs"},  # leaves: checks, formats, data, helpers
    {"kernels"},  # the face of the C++ kernels
    {"models"},  # checkpoints -> blocks
    {"method"},  # partition, attention, the engine, the twin: knows nothing of transports it is not handed
    {"options"},  # RunOptions
    {"executor"},  # a request: planned, encoded, run by each device; the in-process executor
    {"api", "outputs"},  # the model face; results as plain dicts
    {"runtime"},  # the cluster executor: processes over gloo
    {"jobs", "training", "evaluation", "bench"},  # applications of the model face
    {"serve"},  # the HTTP server
    {"cli"},  # the commands
    {"__main__"},  # python -m prism_ext
]
LAYER = {group: i for i, groups in enumerate(LAYERS) for group in groups}


def _group(module: str) -> str:
    """prism_ext.method.engine -> method; prism_ext.cli.run -> cli."""
    return module.split(".")[1]


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a name inside a module, not a submodule
        return False


def _imports(path: Path, module: str):
    """(line, imported module) of every import of the package in ``path``."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "prism_ext":
                continue
            for alias in node.names:  # `from . import engine` imports the module prism_ext.engine
                sub = f"{target}.{alias.name}"
                yield node.lineno, sub if _is_module(sub) else target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "prism_ext":
                    yield node.lineno, alias.name


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if module != "prism_ext":  # the package's face imports what it exports
            yield path, module


def test_every_group_has_a_layer():
    groups = {_group(m) for _, m in _modules()}
    assert groups <= set(LAYER), f"modules of no layer: {sorted(groups - set(LAYER))} (add them to LAYERS)"


def test_imports_point_down():
    wrong = []
    for path, module in _modules():
        mine = _group(module)
        for line, target in _imports(path, module):
            if target == "prism_ext":
                wrong.append(f"{module}:{line} imports the package root (import the module that defines it)")
                continue
            theirs = _group(target)
            if theirs != mine and LAYER[theirs] >= LAYER[mine]:
                wrong.append(f"{module}:{line} imports {target}: {theirs} (layer {LAYER[theirs]}) is not below "
                             f"{mine} (layer {LAYER[mine]})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)
