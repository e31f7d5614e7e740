"""The package's layers import one way and never take private names from another module.

Layers, lowest first (``emokern/__init__.py`` describes them): util → ops → core → engines → extraction →
validation → experiments → pipeline → ui → cli / testing. Every ``import emokern.X`` / ``from emokern.X import Y``
in a module, at top level or inside a function, must name its own layer or a lower one. The programs in
``experiments/sandboxed/`` are left out: they run inside the sandbox and import nothing of emokern.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "emokern"
LAYERS = {"version": 0, "util": 0, "_C": 1, "ops": 1, "core": 2, "engines": 3, "extraction": 4, "validation": 5,
          "experiments": 6, "pipeline": 7, "ui": 8, "cli": 9, "__main__": 9, "testing": 9}
FACE = 10  # the package's __init__: it may import anything, and nothing inside the package imports it


def _layer(dotted: str) -> int:
    parts = dotted.split(".")[1:]
    return FACE if not parts else LAYERS[parts[0]]


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        if "sandboxed" in rel.parts:
            continue
        yield ".".join(rel.parts).removesuffix(".__init__"), path


def _emokern_imports(path: Path):
    """(module, name or None, line) for every absolute import of emokern in the file."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "emokern":
            for alias in node.names:
                yield node.module, alias.name, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "emokern":
                    yield alias.name, None, node.lineno


def _target_layer(module: str, name) -> int:
    if module == "emokern" and name is not None and name != "__version__":
        return LAYERS.get(name, FACE)  # `from emokern import core` is the subpackage; anything else the face
    if module == "emokern" and name == "__version__":
        return FACE
    return _layer(module)


def test_every_module_has_a_layer():
    for module, _ in _modules():
        assert module == "emokern" or module.split(".")[1] in LAYERS, f"{module}: no layer; add it to LAYERS"


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, path in _modules():
        if module == "emokern":
            continue
        mine = _layer(module)
        for target, name, line in _emokern_imports(path):
            if _target_layer(target, name) > mine:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} imports {target}"
                              f"{'.' + name if name else ''}")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_no_private_names_cross_modules():
    private = []
    for module, path in _modules():
        for target, name, line in _emokern_imports(path):
            hidden = name is not None and name.startswith("_") and not name.startswith("__")
            hidden_module = any(p.startswith("_") and p not in ("_C", "__main__") for p in target.split(".")[1:])
            if hidden or hidden_module:
                private.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {target}{'.' + name if name else ''}")
    assert not private, "private names imported from other modules:\n" + "\n".join(private)


@pytest.mark.parametrize("source, expected", [
    ("from emokern.validation.report import x", 5), ("import emokern.engines.vllm.worker", 3),
    ("from emokern import core", 2), ("from emokern import patch", FACE),
])
def test_the_checker_reads_layers(tmp_path, source, expected):
    f = tmp_path / "m.py"
    f.write_text(source + "\n")
    (target, name, _), = _emokern_imports(f)
    assert _target_layer(target, name) == expected
