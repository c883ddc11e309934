"""The package layout: every module in a subpackage by stage, imports pointing down the stage order only, a
docstring on every subpackage, and no module over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fxmpq"
PASSES = ROOT / "passes"  # installed as fxmpq.passes

# the stage order: a module may import its own unit and any unit of a lower rank, never a higher one
RANK = {
    "errors": 0,
    "core": 1,
    "models": 1,
    "hardware": 2,
    "capture": 3,
    "cost": 4,
    "quant": 5,
    "passes": 6,
    "stages": 7,
    "policy_search": 8,
    "train": 9,
    "export": 10,
    "profiling": 11,
    "pipeline": 12,
    "cli": 13,
    "__init__": 14,
    "__main__": 14,
}
ROOT_MODULES = {"__init__", "__main__", "errors", "pipeline", "stages"}
MAX_LINES = 500


def modules() -> list[tuple[str, Path]]:
    """(dotted name under fxmpq, path) of every module of the installed package."""
    out = [(".".join(p.relative_to(PKG).with_suffix("").parts), p) for p in PKG.rglob("*.py")]
    out += [("passes." + p.stem, p) for p in PASSES.glob("*.py")]
    return sorted(out)


def unit(dotted: str) -> str:
    """The stage unit of a module: its subpackage, or the root module itself."""
    return dotted.split(".")[0]


def imports(dotted: str, path: Path) -> list[tuple[int, str]]:
    """(line, target under fxmpq) of every import that runs when the module is imported or called (not the
    ones under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    package = dotted.split(".")[:-1]  # a module's package (for `x/__init__`: x itself)
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                mod = [*base, *(node.module.split(".") if node.module else [])]
                if not node.module:  # `from . import x`: x is a module of that package
                    out += [(node.lineno, ".".join([*mod, a.name])) for a in node.names]
                    continue
                out.append((node.lineno, ".".join(mod)))
            elif node.module and node.module.startswith("fxmpq."):
                out.append((node.lineno, node.module[len("fxmpq."):]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name[len("fxmpq."):]) for a in node.names if a.name.startswith("fxmpq.")]
    return out


def test_root_holds_only_entry_modules() -> None:
    root = {p.stem for p in PKG.glob("*.py")}
    assert root == ROOT_MODULES
    units = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert units | {"passes"} | ROOT_MODULES == set(RANK)


@pytest.mark.parametrize("sub", sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()))
def test_every_subpackage_says_what_it_owns(sub: str) -> None:
    doc = ast.get_docstring(ast.parse((PKG / sub / "__init__.py").read_text()))
    assert doc and len(doc) > 40, f"fxmpq/{sub}/__init__.py needs a docstring naming its job"


def test_imports_point_down_the_stage_order() -> None:
    bad = []
    for dotted, path in modules():
        own = unit(dotted)
        for line, target in imports(dotted, path):
            tu = unit(target)
            assert tu in RANK, f"{path.relative_to(ROOT)}:{line} imports fxmpq.{target}, a unit RANK does not list"
            if tu != own and RANK[tu] > RANK[own]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({own}, rank {RANK[own]}) imports fxmpq.{target} "
                           f"({tu}, rank {RANK[tu]})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_module_over_500_lines() -> None:
    long = [f"{p.relative_to(ROOT)}: {n}" for _, p in modules() if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The import walk finds relative and absolute imports and skips TYPE_CHECKING ones (so the test can fail)."""
    f = tmp_path / "m.py"
    f.write_text("from typing import TYPE_CHECKING\nfrom ..export.lower import lower\nimport fxmpq.train.loop\n"
                 "if TYPE_CHECKING:\n    from ..cli import main\n")
    assert imports("capture.m", f) == [(2, "export.lower"), (3, "train.loop")]


def test_value_preserving_ops_come_from_one_vocabulary() -> None:
    """The matcher's chains, the lowering's on-grid walk, the parity check's output step and the non-negativity
    pattern all walk through the shape ops of fxmpq.capture.value_ops (one list, four users)."""
    from fxmpq.capture import matcher, value_ops
    from fxmpq.export import parity
    from fxmpq.passes import lower_qdq, patterns

    v = value_ops
    assert v.SHAPE_METHODS <= patterns._GRID_METHODS and v.SHAPE_METHODS <= patterns._PASS_METHODS
    assert v.RESHAPE_METHODS <= matcher._CHAIN_METHODS
    assert set(v.SHAPE_MODULES) <= set(patterns._GRID_MODULES) & set(patterns._PASS_MODULES) & set(
        matcher._CHAIN_MODULES)
    assert v.SHAPE_FUNCTIONS <= patterns._GRID_FUNCTIONS & patterns._PASS_FUNCTIONS & matcher._CHAIN_FUNCTIONS
    assert v.SELECT_FUNCTIONS <= patterns._GRID_FUNCTIONS & patterns._PASS_FUNCTIONS
    src = Path(parity.__file__).read_text()
    assert "SHAPE_METHODS" in src and "SHAPE_MODULES" in src  # output_step walks the same vocabulary
    for mod in (matcher, lower_qdq, patterns, parity):  # and no module keeps a hand-written copy
        assert '"view", "reshape"' not in Path(mod.__file__).read_text(), mod.__name__


def test_no_function_level_imports_of_fxmpq_modules() -> None:
    """Every fxmpq import sits at the top of its module (or under TYPE_CHECKING): none hides a cycle in a function.
    Heavy third-party libraries (matplotlib, torchvision) may still be imported where they are used."""
    late = []
    for _, path in modules():
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("fxmpq")):
                    late.append(f"{path.relative_to(ROOT)}:{node.lineno}")
                elif isinstance(node, ast.Import) and any(a.name.startswith("fxmpq") for a in node.names):
                    late.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not late, f"function-level fxmpq imports: {late}"
