"""Rules of the code's shape that no behaviour test sees (issue 11 item 6).

Library classes are handed their reactor by the assembly (``tap.py``): none
imports Twisted's global reactor, which would silently tie it to the real
clock (a test's ``Clock`` could not drive it). The type check itself runs as
tox's ``types`` environment (``mypy --strict dtsbridge``, settings in mypy.ini).
"""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "dtsbridge"
#: The assembly: the one place that takes the global reactor and hands it on.
ASSEMBLY = {"tap.py"}


def _imports_global_reactor(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "twisted.internet":
            if any(alias.name == "reactor" for alias in node.names):
                lines.append(node.lineno)
        elif isinstance(node, ast.Import):
            if any(alias.name == "twisted.internet.reactor" for alias in node.names):
                lines.append(node.lineno)
    return sorted(lines)


def test_no_library_module_takes_the_global_reactor() -> None:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ASSEMBLY:
            continue
        lines = _imports_global_reactor(ast.parse(path.read_text(), str(path)))
        if lines:
            found[rel] = lines
    assert not found, f"modules importing the global reactor (take it as a parameter instead): {found}"


def test_the_check_finds_an_import_of_the_global_reactor() -> None:
    """The rule above can fail: both spellings of the import are seen, inside a function too."""
    src = "def f():\n    from twisted.internet import reactor\n\nimport twisted.internet.reactor\n"
    assert _imports_global_reactor(ast.parse(src)) == [2, 4]


def test_the_type_check_is_strict_everywhere_and_runs_in_the_default_tox() -> None:
    mypy = configparser.ConfigParser()
    mypy.read(REPO / "mypy.ini")
    assert mypy.getboolean("mypy", "strict")
    for section in mypy.sections():
        assert not mypy.getboolean(section, "ignore_errors", fallback=False), section
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(REPO / "tox.ini")
    envs = [e.strip() for e in tox["tox"]["envlist"].split(",")]
    assert "types" in envs
    assert "mypy --strict dtsbridge" in tox["testenv:types"]["commands"]
