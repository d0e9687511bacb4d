"""The package as installed holds every module and page file of the source tree.

The end-to-end tests run the source tree (PYTHONPATH), so only this test notices a
subpackage (such as ``dtsbridge.engine``) or a data file that setup.py leaves out of
what ``pip install .`` installs.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_the_installed_package_holds_every_module_and_page_file() -> None:
    dist = importlib.metadata.distribution("dtsbridge")
    direct = dist.read_text("direct_url.json")
    if direct and json.loads(direct).get("dir_info", {}).get("editable"):
        pytest.skip("an editable install (a development venv): tox installs the built package and checks it")
    installed = {Path(str(f)).as_posix() for f in (dist.files or [])}
    expected = {p.relative_to(REPO).as_posix() for p in (REPO / "dtsbridge").rglob("*")
                if p.suffix in {".py", ".html", ".js", ".css"} and "__pycache__" not in p.parts}
    assert expected, "no source files found"
    missing = sorted(expected - installed)
    assert not missing, f"pip install . leaves out: {missing}"
    assert "twisted/plugins/dtsbridge_plugin.py" in installed
