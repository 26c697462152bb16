"""The documentation site builds with no warning (mkdocs --strict): every API docstring parses,
every snippet and link resolves."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_build_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (it is in the dev extra)")
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "rmsprop_update" in api and "skip_nonfinite" in api
    guide = (tmp_path / "site" / "guide" / "index.html").read_text()
    assert "Quick start" in guide and "Threads, processes, checkpoints" in guide
    assert "x seed NumPy" in (tmp_path / "site" / "performance" / "index.html").read_text()
