"""The package layering README's Layout section states: imports go one way,
data_prep <- sid_tokenizer <- eval <- recipes <- benchmarks, also inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["data_prep", "sid_tokenizer", "eval", "recipes", "benchmarks"]


def imported_packages(path: Path) -> set[str]:
    """Top-level sidrec packages a file imports anywhere (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out & set(LAYERS)


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_no_upward_imports(layer: str) -> None:
    above = set(LAYERS[LAYERS.index(layer) + 1 :])
    bad = {
        str(p.relative_to(ROOT)): sorted(imported_packages(p) & above)
        for p in sorted((ROOT / layer).rglob("*.py"))
        if imported_packages(p) & above
    }
    assert not bad, f"{layer} must not import {sorted(above)}: {bad}"


def test_checker_sees_function_level_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from recipes.tasks import TASKS\n    import eval.metrics\n")
    assert imported_packages(f) == {"recipes", "eval"}


def test_entry_scripts_stay_thin() -> None:
    """open-r1 style: the entry scripts parse and call the package (each <= ~120 lines)."""
    sizes = {n: len((ROOT / "recipes" / n).read_text().splitlines()) for n in ("sft.py", "rl.py", "serve.py")}
    assert all(v <= 130 for v in sizes.values()), sizes
