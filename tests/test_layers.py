"""No dermanet module imports a layer above its own (docs/architecture.md, "Layers").

Read from the source with `ast` (lazy imports inside functions count too), so the test needs
none of the heavy packages and fails on the line that breaks the order.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top (numbered from 1 in the docs and messages); a module may import its own layer
# and the layers below it. Each name is a top-level module or package of `dermanet`
# (`dermanet` itself: the package's __init__).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("dermanet", "classes", "paths", "settings", "storage", "runtime", "answer"),
    ("db", "tracking"),
    ("accounts", "cases"),
    ("models",),
    ("data",),
    ("trust",),
    ("inference",),
    ("eval",),
    ("train",),
    ("serving", "monitoring"),
    ("ui",),
    ("cli", "demo", "recipes"),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
OUTSIDE = ("jobs", "serve", "benchmarks", "tests", "tools")  # nothing in dermanet imports these


def unit(module: str) -> str:
    """`dermanet.inference.batch` -> `inference`; `dermanet` -> `dermanet`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import of a module file (relative ones resolved by
    the caller are not used in dermanet)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            # `from dermanet import inference` imports the subpackage
            if node.module == "dermanet":
                found += [(node.lineno, f"dermanet.{alias.name}") for alias in node.names]
    return found


def violations(package: Path) -> list[str]:
    """Every import of a higher layer (or of a folder outside the package) under `package`."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package.parent).with_suffix("")
        module = ".".join(relative.parts).removesuffix(".__init__")
        own = unit(module)
        if own not in RANK:
            problems.append(f"{relative}: {own!r} has no layer; add it to LAYERS and the docs")
            continue
        for line, name in imported_modules(path.read_text()):
            top = name.split(".")[0]
            if top in OUTSIDE:
                problems.append(f"{relative}.py:{line} imports {name} (outside the package)")
            if top != "dermanet" or name == "dermanet":
                continue
            target = unit(name)
            if target in RANK and RANK[target] > RANK[own]:
                problems.append(
                    f"{relative}.py:{line}: {own} (layer {RANK[own] + 1}) imports {name} "
                    f"(layer {RANK[target] + 1}, above it)"
                )
    return problems


def test_no_module_imports_a_higher_layer() -> None:
    assert violations(ROOT / "dermanet") == []


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    package = tmp_path / "dermanet"
    (package / "trust").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "trust" / "bad.py").write_text(
        "def f():\n    from dermanet.inference.predictor import Predictor\n    return Predictor\n"
    )
    (package / "trust" / "fine.py").write_text("from dermanet.data.images import decode_image\n")
    (package / "mystery.py").write_text("")
    problems = violations(package)
    assert len(problems) == 2
    assert "trust/bad.py:2: trust (layer 6) imports dermanet.inference.predictor" in problems[1]
    assert "'mystery' has no layer" in problems[0]


def test_the_docs_state_the_same_order() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("## Layers") :]
    positions = [section.find(f"`{names[0]}`") for names in LAYERS[1:]]
    assert all(p > 0 for p in positions), "docs/architecture.md misses a layer"
    assert positions == sorted(positions), "docs/architecture.md lists the layers out of order"
