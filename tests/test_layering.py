"""The floors of jetnas import one way (ARCHITECTURE.md): every `import` of every module, function-level imports
included, read from its syntax tree, goes to its own package or to a lower floor; and nothing but the CLI imports
the command adapters (`jetnas.commands`)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jetnas"

#: low to high. A module may import its own package and anything on a lower floor, nothing on its own floor (other
#: packages) or above. `files` and `manifest` (checksums) are leaves every floor may use; `validation` (one error
#: type and the input checks) knows the layer registry and serves models, data and tasks. In the library floors,
#: `engine` and `evaluation` do not import each other; `train` may use the evaluation's tasks (the recall data it
#: builds must stay disjoint from them) and never imports `nas`; `bench` measures with the engine and `nas` searches
#: with the trainer's losses and the evaluation tasks.
FLOORS: list[tuple[str, ...]] = [
    ("files", "manifest"),
    ("ops",),
    ("modules",),
    ("layers",),
    ("validation",),
    ("models",),
    ("engine", "evaluation"),
    ("train",),
    ("bench", "nas"),
    ("runner",),
    ("report",),
    ("pipeline",),
    ("commands",),
    ("cli",),
    ("__main__",),
]
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}
#: `import jetnas` registers the model type with transformers' Auto classes: the package root may import `models`
ROOT_MAY_IMPORT = {"models"}


def package_of(module: str) -> str:
    """`jetnas.nas.blocks` -> `nas`; `jetnas.cli` -> `cli`; `jetnas` -> `` (the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """`(line, module)` of every jetnas import in `source` (module-level and inside functions), relative imports
    resolved; `from jetnas import x` counts as importing `jetnas.x`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] if base == "jetnas" else [base]
            found += [(node.lineno, name) for name in names]
    return sorted((line, name) for line, name in found if name == "jetnas" or name.startswith("jetnas."))


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    here = package_of(module)
    problems = []
    for line, target in imports(source, module, is_package):
        there = package_of(target)
        if there == "" or there == here:
            continue
        if here == "":
            allowed = there in ROOT_MAY_IMPORT
        else:
            allowed = FLOOR[there] < FLOOR[here]
        if there == "commands" and here != "cli":
            allowed = False
        if not allowed:
            problems.append(f"{module}:{line} imports {target} ({here or 'jetnas'} may not import {there})")
    return problems


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def test_every_package_is_on_a_floor():
    packages = {package_of(module) for module, _ in modules()} - {""}
    assert packages <= set(FLOOR), f"put {sorted(packages - set(FLOOR))} on a floor in FLOORS (and ARCHITECTURE.md)"


def test_imports_go_down_the_floors():
    problems = [p for module, path in modules()
                for p in violations(path.read_text(), module, path.name == "__init__.py")]
    assert problems == [], "\n".join(problems)


def test_the_walker_sees_function_level_and_relative_imports():
    # a lower floor reaching up from inside a function, and a relative import of the command adapters: both caught
    source = "def f():\n    from jetnas.runner.recipes import Recipe\n\nfrom ..commands import run\n"
    assert violations(source, "jetnas.train.stages") == [
        "jetnas.train.stages:2 imports jetnas.runner.recipes (train may not import runner)",
        "jetnas.train.stages:4 imports jetnas.commands (train may not import commands)"]
    assert violations("from jetnas import commands\n", "jetnas.pipeline") == [
        "jetnas.pipeline:1 imports jetnas.commands (pipeline may not import commands)"]
    assert violations("import jetnas.nas.blocks\n", "jetnas.train.stages") != []
    assert violations("from jetnas.commands import run\n", "jetnas.cli") == []
