"""The documentation: the README stays short and its links resolve; the docs pages build with
``mkdocs build --strict`` (a broken link or anchor fails), as ``make docs`` does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_readme_is_a_two_minute_read_and_its_links_resolve():
    readme = REPO / "README.md"
    assert readme.stat().st_size < 12 * 1024
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme.read_text(encoding="utf-8")):
        assert (REPO / target).exists(), target


def test_docs_build_strict(tmp_path):
    """mkdocs comes with the test extra (``make test`` installs it)."""
    mkdocs = Path(sys.executable).parent / "mkdocs"
    result = subprocess.run([str(mkdocs) if mkdocs.exists() else "mkdocs", "build", "--strict", "--site-dir",
                             str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
