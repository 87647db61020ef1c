"""Imports flow one way: no module imports from a layer above its own (checked on the source, function-level
imports included)."""
import ast
from pathlib import Path

import qlab

LAYERS = ["core", "gguf", "kernels", "methods", "models", "eval", "study", "benchmarks", "cli"]  # bottom to top
ROOT = Path(qlab.__file__).parent


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "qlab" or len(parts) < 2:
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            if node.module == "qlab":
                yield from (f"qlab.{a.name}" for a in node.names)


def test_every_package_folder_is_a_layer():
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert folders == set(LAYERS)
    assert {p.name for p in ROOT.glob("*.py")} == {"__init__.py"}  # no loose modules beside the layers


def test_no_module_imports_from_a_layer_above():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        module = ".".join(("qlab",) + path.relative_to(ROOT).with_suffix("").parts)
        own = _layer(module)
        if own is None:  # qlab/__init__.py: the top-level re-exports
            continue
        for imported in _imports(path):
            theirs = _layer(imported)
            if theirs is not None and theirs > own:
                upward.append(f"{module} imports {imported}")
    assert not upward, "\n".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from qlab.models.walker import quantize_model\n    from qlab import study\n")
    assert list(_imports(bad)) == ["qlab.models.walker", "qlab", "qlab.study"]
    assert _layer("qlab.models.walker") > _layer("qlab.core.quant")
