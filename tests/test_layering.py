"""Import layering (docs/architecture.md, "Layers"): base <- engine <- platform, never upwards.

Read from the source with ``ast`` (nothing is imported), so a lazy import inside a function counts
as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import accord

ROOT = Path(accord.__file__).parent
BASE = ("accord.utils",)
ENGINE = ("accord.losses", "accord.matchers", "accord.heads", "accord.dist", "accord.boxes")
# Named so a typo in the allow-lists below cannot let one of them through unnoticed.
PLATFORM = (
    "accord.config",
    "accord.training",
    "accord.cli",
    "accord.plugins",
    "accord.registry",
    "accord.demo",
    "accord.report",
    "accord.benchmarking",
    "accord.toy",
    "accord.builtin",
)


def _module_name(path: Path) -> str:
    parts = ("accord", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_modules(package: str) -> list[Path]:
    directory = ROOT.joinpath(*package.split(".")[1:])
    return sorted(directory.rglob("*.py"))


def imported_accord_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Every ``accord`` module named by an import in ``source`` (relative imports resolved).

    ``from accord import x`` names ``accord.x`` (``x`` is a submodule, or an attribute of the root
    package, which no lower layer may use either); ``import accord`` names the root ``accord``.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                base = ".".join(anchor[: len(anchor) - node.level + 1])
                origin = f"{base}.{node.module}" if node.module else base
            else:
                origin = node.module or ""
            # From the root package the names are the modules (from accord import dist).
            found.update([f"{origin}.{alias.name}" for alias in node.names] if origin == "accord" else [origin])
    return {name for name in found if name == "accord" or name.startswith("accord.")}


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == package or name.startswith(package + ".") for package in packages)


def _violations(packages: tuple[str, ...], allowed: tuple[str, ...]) -> list[str]:
    problems = []
    for package in packages:
        for path in _package_modules(package):
            module = _module_name(path)
            imported = imported_accord_modules(path.read_text(), module, path.name == "__init__.py")
            for name in sorted(imported):
                if not _within(name, allowed):
                    problems.append(f"{path.relative_to(ROOT.parent)}: imports {name}")
    return problems


def test_the_layers_are_disjoint_and_exist() -> None:
    for package in BASE + ENGINE:
        assert _package_modules(package), f"{package}: no modules found under {ROOT}"
        assert not _within(package, PLATFORM)


def test_engine_imports_only_the_engine_and_the_base() -> None:
    problems = _violations(ENGINE, ENGINE + BASE)
    assert not problems, "engine modules import outside the engine and accord.utils:\n" + "\n".join(problems)


def test_base_imports_nothing_from_accord() -> None:
    problems = _violations(BASE, BASE)
    assert not problems, "accord.utils must not import the rest of accord:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "source, module, is_package, expected",
    [
        ("from accord.config import X", "accord.losses.a", False, {"accord.config"}),
        ("import accord.training.trainer as t", "accord.losses.a", False, {"accord.training.trainer"}),
        ("from accord import dist, registry", "accord.losses.a", False, {"accord.dist", "accord.registry"}),
        ("import accord", "accord.utils.checks", False, {"accord"}),
        ("from ..config import X", "accord.losses.a", False, {"accord.config"}),
        ("from . import tiled", "accord.losses", True, {"accord.losses"}),
        ("from .. import cli", "accord.matchers", True, {"accord.cli"}),
        ("def f():\n    from accord.demo import run", "accord.heads.mlp", False, {"accord.demo"}),
        ("import torch\nfrom typing import Any", "accord.utils.checks", False, set()),
    ],
)
def test_import_parser_sees_every_form(source: str, module: str, is_package: bool, expected: set[str]) -> None:
    assert imported_accord_modules(source, module, is_package) == expected
