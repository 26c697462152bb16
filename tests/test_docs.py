"""The documentation site builds with no warning (mkdocs --strict): every API docstring parses,
every snippet and link resolves."""

import importlib.util
import os
import re
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
    site = tmp_path / "site"
    pages = {name: (site / name / "index.html").read_text() for name in ("api", "api-torch", "api-dask", "api-kernels")}
    assert "skip_nonfinite" in pages["api"] and "<table>" in pages["api"]  # the options as a parameter table
    assert "flatten" in pages["api-torch"] and "LostStateError" in pages["api-dask"]
    assert "rmsprop_update" in pages["api-kernels"]
    for name, html in pages.items():
        # reST markup shows literally in Markdown; private and inherited members stay out
        for leftover in ("``", ":func:", ":mod:", ":class:", "__weakref__", "__dataclass_fields__", "_install"):
            assert leftover not in html, (name, leftover)
    _assert_rendered_as_meant(site)
    guide = (tmp_path / "site" / "guide" / "index.html").read_text()
    assert "Quick start" in guide and "Threads, processes, checkpoints" in guide
    assert "x seed NumPy" in (tmp_path / "site" / "performance" / "index.html").read_text()


def _assert_rendered_as_meant(site):
    """What Markdown can silently get wrong: a list item shown as text ("- **...**" inside a
    paragraph, after a block that ended the list), a path to a docs page written where a link
    is meant (a bare `docs/x.md` outside a link and a command line), and code blocks that
    would scroll sideways at 1280 px (the stylesheet wraps them; it must be there and used)."""
    for page in sorted(site.rglob("*.html")):
        html = page.read_text(encoding="utf-8")
        text = re.sub(r"<pre\b.*?</pre>", "", html, flags=re.S)  # code blocks
        text = re.sub(r"<a\b[^>]*>.*?</a>", "", text, flags=re.S)  # links
        text = re.sub(r"<code>[^<]*\s[^<]*</code>", "", text)  # command lines (a path as an argument)
        name = page.relative_to(site)
        assert not re.search(r"(?:<p>|\n)\s*[-*] <strong>", text), (name, "a list item rendered as text")
        assert not re.search(r"docs/[\w-]+\.md", text), (name, "a docs path where a link is meant")
        if "<pre" in html:
            assert "stylesheets/extra.css" in html, name
    css = (site / "stylesheets" / "extra.css").read_text()
    assert re.search(r"pre > code \{[^}]*white-space: pre-wrap", css), "code blocks must wrap, not scroll"


def _python_blocks(path):
    """The ```python blocks of a Markdown file, in order."""
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), re.S | re.M)


DOCUMENTS = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if _python_blocks(p)]


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_example_in_the_docs_runs(path, tmp_path):
    """Each file's Python blocks run in order, as one script, in a fresh interpreter and an
    empty folder: a documented example can never again be left broken or incomplete."""
    blocks = _python_blocks(path)
    text = "\n\n".join(blocks)
    for module, extra in (("torch", "torch"), ("dask", "dask"), ("ml_dtypes", "bfloat16")):
        needed = re.search(rf"^import {module}|^from fastrms.{module}", text, re.M)
        if needed and importlib.util.find_spec(module) is None:
            pytest.skip(f"{path.name}'s examples need {module}, not installed here (the {extra} extra)")
    env = dict(os.environ)
    if re.search(r"^from numba import cuda", text, re.M):  # a GPU example: on the simulator, where no GPU is
        if importlib.util.find_spec("numba_cuda") is None:
            pytest.skip(f"{path.name}'s examples need numba-cuda, not installed here (the cuda extra)")
        from fastrms.backend import cuda_target

        if not cuda_target()["available"]:
            env["NUMBA_ENABLE_CUDASIM"] = "1"
    script = tmp_path / "examples.py"
    script.write_text(text, encoding="utf-8")
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]


def test_the_readme_examples_need_no_scipy(tmp_path):
    """Numba's ``@`` needs SciPy, which fastrms does not depend on: run the README's examples
    with SciPy made unimportable, so they keep working on a bare ``pip install fastrms``."""
    blocks = _python_blocks(ROOT / "README.md")
    assert len(blocks) >= 3
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "scipy").mkdir()
    (blocker / "scipy" / "__init__.py").write_text("raise ImportError('scipy is blocked for this test')\n")
    script = tmp_path / "examples.py"
    script.write_text("\n\n".join(blocks), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(ROOT)]))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
