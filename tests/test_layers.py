"""The layers point one way: cli -> stages -> trainer -> memory -> models / algos -> ops -> _backend.

Every import in the package is counted: top-level and function-level ``import`` / ``from ... import``
statements, and "rlhf_fast.module" / "rlhf_fast.module:attr" strings (lazy registries, importlib).
A module may import its own layer or a lower one; the
ops never import transformers (nor anything above them); the trainer never imports triton. The memory
planner sits below the trainer, which asks its predictor whether a step needs activation recompute.
docs/design.md draws the same picture."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "rlhf_fast"

# rank: a module may import modules of its own rank or below.
LAYERS = {
    "_backend": 0, "_C": 0, "measure": 0, "presets": 0,
    "ops": 1,
    "algos": 2, "estimators": 2, "models": 2,
    "memory": 2.5,
    "trainer": 3,
    "stages": 4,
    "selfcheck": 4.5,
    "cli": 5, "testing": 5, "__init__": 5, "__main__": 5,
}
# Same rank, but sideways: neither may import the other.
SIDEWAYS: set[tuple[str, str]] = set()
STRING_REF = re.compile(r"^rlhf_fast(\.[A-Za-z_][\w]*)+(:[A-Za-z_]\w*)?$")


def _layer_of_path(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _layer_of_module(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "rlhf_fast":
        return None
    if len(parts) == 1 or not ((PKG / parts[1]).is_dir() or (PKG / f"{parts[1]}.py").is_file() or parts[1] == "_C"):
        return "__init__"  # a name defined by rlhf_fast/__init__.py
    return parts[1]


def _references(path: Path) -> list[tuple[int, str]]:
    """(line, imported rlhf_fast module) for every import statement and module-path string in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(("rlhf_fast",) + path.relative_to(PKG).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "rlhf_fast":  # from rlhf_fast import stages -> the submodule (or a name of __init__)
                out += [(node.lineno, f"rlhf_fast.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, mod))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and STRING_REF.match(node.value):
            out.append((node.lineno, node.value.split(":")[0]))
    return out


def _modules():
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_top_level_module_has_a_layer():
    names = {_layer_of_path(p) for p in _modules()}
    assert names <= set(LAYERS), f"modules without a layer (add them to LAYERS and docs/design.md): {names - set(LAYERS)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path):
    src = _layer_of_path(path)
    bad = []
    for line, module in _references(path):
        if module.split(".")[0] == "transformers" and src in ("ops", "_backend", "measure"):
            bad.append(f"line {line}: {module} (the ops never import transformers)")
        if module.split(".")[0] == "triton" and src == "trainer":
            bad.append(f"line {line}: {module} (the trainer never imports triton)")
        dst = _layer_of_module(module)
        if dst is None or dst == src:
            continue
        if dst not in LAYERS:
            bad.append(f"line {line}: {module} (no such top-level module)")
        elif LAYERS[dst] > LAYERS[src] or (src, dst) in SIDEWAYS:
            bad.append(f"line {line}: {module} ({src} may not import {dst})")
    assert not bad, f"{path.relative_to(PKG)} imports upward or sideways:\n" + "\n".join(bad)


def test_the_checker_sees_function_level_imports_and_strings(tmp_path):
    """The scan itself: a function-level import and a "module:attr" string are both found."""
    f = PKG / "ops" / "_layers_probe_tmp.py"
    f.write_text('def f():\n    from rlhf_fast.trainer import ppo\n\nREG = "rlhf_fast.stages.sft:train_sft"\n')
    try:
        refs = {m for _, m in _references(f)}
    finally:
        f.unlink()
    assert {"rlhf_fast.trainer", "rlhf_fast.stages.sft"} <= refs


def test_module_sizes():
    """trainer/ppo.py stays readable; no module outside ops/ is over ~600 lines."""
    too_big = {str(p.relative_to(PKG)): n for p in _modules()
               if (n := len(p.read_text(encoding="utf-8").splitlines())) > 620 and "ops" not in p.parts}
    assert not too_big, too_big
    assert len((PKG / "trainer" / "ppo.py").read_text(encoding="utf-8").splitlines()) <= 500
