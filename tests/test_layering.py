"""Import rules of the project's layers, checked on the source with `ast` (an import-linter of our own).

* `shared/` is the bottom layer: nothing under it imports `services` (`import services...` or
  `from services... import ...`, relative imports resolved).
* No module takes another module's private names: `from X import _name`, X a module of this repository, is allowed
  only where X is the importing module's own package (`from . import _name`); neither is `module._name` on a project
  module it imported. Third-party private names (`ray._private`) are outside these rules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("shared", "services", "bench", "scripts", "tests")
PROJECT_PACKAGES = ("shared", "services", "bench", "scripts", "tests")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path: Path) -> str:
    """The package a file belongs to: itself for an __init__.py, else its directory."""
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def absolute(node: ast.ImportFrom, path: Path) -> str:
    """The module an ImportFrom names, relative levels resolved against the importing file's package."""
    if not node.level:
        return node.module or ""
    base = package_of(path).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def is_project_module(name: str) -> bool:
    """True where `name` is a module or package of this repository (not a variable inside one)."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def source_files() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS if (ROOT / d).is_dir() for p in (ROOT / d).rglob("*.py"))


def layer_violations(path: Path, tree: ast.AST) -> list[str]:
    """`shared/` importing `services`."""
    if path.relative_to(ROOT).parts[0] != "shared":
        return []
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [absolute(node, path)]
        found += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "services"]
    return found


def private_violations(path: Path, tree: ast.AST) -> list[str]:
    """`from X import _name` with X not the file's own package, and `module._name` on an imported project module."""
    own = package_of(path)
    where = path.relative_to(ROOT)
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = absolute(node, path)
            for alias in node.names:
                if is_private(alias.name) and source != own and source.split(".")[0] in PROJECT_PACKAGES:
                    found.append(f"{where}:{node.lineno} from {source} import {alias.name}")
                elif is_project_module(f"{source}.{alias.name}"):
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules.update(a.asname for a in node.names if a.asname and is_project_module(a.name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            if is_private(node.attr):
                found.append(f"{where}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def check(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return layer_violations(path, tree) + private_violations(path, tree)


def test_the_source_is_found():
    files = {module_name(p) for p in source_files()}
    assert {"shared.guidance_client", "shared.guidance_api", "services.guidance.engine"} <= files


def test_shared_never_imports_services_and_no_module_takes_anothers_private_names():
    problems = [problem for path in source_files() for problem in check(path)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("relative", "code", "expected"),
    [
        ("shared/x.py", "import services.guidance.sds\n", "imports services.guidance.sds"),
        ("shared/x.py", "from services.guidance import messages\n", "imports services.guidance"),
        ("shared/sub/x.py", "from ...services import cli\n", "imports services"),
        ("services/a/x.py", "from services.guidance.sds import _VIEW\n", "from services.guidance.sds import _VIEW"),
        ("services/a/x.py", "from .sds import _VIEW\n", "from services.a.sds import _VIEW"),
        ("services/guidance/x.py", "from services.guidance import sds\nsds._VIEW\n", "sds._VIEW"),
        ("services/a/x.py", "import shared.errors as errors\nerrors._pack\n", "errors._pack"),
    ],
)
def test_the_rules_catch_what_they_forbid(relative, code, expected):
    path = ROOT / relative
    (problem,) = layer_violations(path, ast.parse(code)) + private_violations(path, ast.parse(code))
    assert problem.endswith(expected)


@pytest.mark.parametrize(
    ("relative", "code"),
    [
        ("shared/x.py", "from shared.errors import NotFound\nimport grpc\n"),
        ("services/guidance/x.py", "from . import _helper\nfrom services.guidance import _other\n"),
        ("services/guidance/x.py", "from ray._private import ray_constants\nfrom torch import _C\n"),
        ("services/a/x.py", "from services.guidance import sds\nsds.VIEW_SUFFIXES\nsds.__name__\n"),
        ("services/a/x.py", "def f(self):\n    return self._lock\n"),
    ],
)
def test_the_rules_allow_the_rest(relative, code):
    path = ROOT / relative
    assert layer_violations(path, ast.parse(code)) + private_violations(path, ast.parse(code)) == []
