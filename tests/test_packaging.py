"""The project's own promises about set-up: the README's two commands are what CI runs, the
test environment is pinned, the runtime lower bounds are the tested ones, and the package is
typed."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pins(path):
    return dict(
        line.split("==", 1) for line in (ROOT / path).read_text().splitlines() if line and not line.startswith("#")
    )


def test_ci_runs_exactly_the_readmes_two_commands():
    out = subprocess.run(
        [sys.executable, ".ci/readme_commands.py", "README.md"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    main_job, tests = out.stdout.splitlines()
    assert "python -m fastrms demo" in main_job and "-c requirements/ci.txt" in main_job
    assert tests.endswith("python -m pytest") and "-c requirements/ci.txt" in tests
    assert "ruff check" in tests and "ruff format --check" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python .ci/readme_commands.py README.md" in ci and "python3 -m venv" not in ci.replace('"$PYTHON"', "")
    assert '-m venv "$work/venv"' in ci and "--system-site-packages" not in ci
    # and the installed wheel is tested too, from a tree without the source package
    wheel_stage = ci.split("venv-wheel")[1].split("venv-min")[0]
    assert "pip wheel" in ci and "--exclude=./fastrms" in ci and "install -e" not in wheel_stage


def test_a_readme_whose_setup_block_drifted_fails_the_command_reader(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("## Set-up\n\n```bash\npython -m pip install -e .\n```\n")
    out = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "readme_commands.py"), str(readme)], capture_output=True, text=True
    )
    assert out.returncode != 0 and out.stderr.count("\n") == 1 and "two commands" in out.stderr


def test_every_dev_dependency_is_pinned():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {name.lower().replace("_", "-") for name in _pins("requirements/ci.txt")}
    for requirement in project["optional-dependencies"]["dev"] + project["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in requirements/ci.txt"


def test_the_runtime_lower_bounds_are_the_tested_minimum_versions():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    bounds = dict(
        re.fullmatch(r"([a-z]+)>=([0-9.]+)", dep).groups()
        for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    )
    minimum = _pins("requirements/minimum.txt")
    assert set(bounds) == set(minimum)
    for name, low in bounds.items():
        assert minimum[name].startswith(low), f"{name}: pyproject says >={low}, CI tests {minimum[name]}"


def test_the_package_is_typed():
    import inspect

    import fastrms

    assert (Path(fastrms.__file__).parent / "py.typed").exists()
    for fn in (fastrms.RMSprop.__init__, fastrms.RMSprop.step, fastrms.rmsprop, fastrms.info):
        hints = inspect.get_annotations(fn)
        assert "return" in hints, f"{fn.__qualname__} has no return annotation"


def _build(tmp_path, kind):
    """Build a wheel or an sdist of a copy of the repository with the project's own backend."""
    if not (ROOT / "fastrms").is_dir():
        pytest.skip("no source tree beside the tests: this run tests an installed wheel (.ci/run)")
    src = tmp_path / "repo"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "dist", "*.nbi", "*.nbc", ".venv"),
    )
    out = tmp_path / "out"
    code = f"from setuptools import build_meta as b; print(b.build_{kind}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def _package_files():
    pkg = ROOT / "fastrms"
    return {f"fastrms/{p.relative_to(pkg).as_posix()}" for p in pkg.rglob("*.py") if "__pycache__" not in p.parts} | {
        "fastrms/py.typed"
    }


@pytest.mark.slow
def test_the_wheel_holds_every_module_of_the_source_tree(tmp_path):
    """A wheel from a hand-kept package list had no fastrms/kernels or fastrms/bench: an
    installed fastrms could not import."""
    import zipfile

    setuptools = pytest.importorskip("setuptools", reason="the build backend (setuptools) is not installed here")
    from packaging.version import Version

    if Version(setuptools.__version__) < Version("70.1") and importlib.util.find_spec("wheel") is None:
        pytest.skip(f"setuptools {setuptools.__version__} builds wheels only with the wheel package, absent here")
    wheel = _build(tmp_path, "wheel")
    names = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("fastrms/")}
    assert names == _package_files()
    assert any(n.endswith("entry_points.txt") for n in zipfile.ZipFile(wheel).namelist())


@pytest.mark.slow
def test_the_sdist_holds_every_module(tmp_path):
    import tarfile

    pytest.importorskip("setuptools", reason="the build backend (setuptools) is not installed here")
    sdist = _build(tmp_path, "sdist")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert _package_files() <= names
    assert {"pyproject.toml", "README.md"} <= names


@pytest.mark.slow
def test_a_second_install_of_the_same_wheel_loads_every_kernel_the_first_compiled(tmp_path):
    """Numba names its cache folder after the source's absolute path, so a second install of
    the same fastrms (another venv, CI's wheel stage) compiled every kernel again."""
    import json

    pytest.importorskip("setuptools", reason="the build backend (setuptools) is not installed here")
    wheel = _build(tmp_path, "wheel")
    script = (
        "import json, numpy as np, fastrms\n"
        "w = np.zeros(1000, np.float32); fastrms.RMSprop(w, 1e-3, momentum=0.9).step(np.ones_like(w))\n"
        "ws = [np.zeros(30) for _ in range(3)]; fastrms.RMSprop(ws, 1e-3).step([np.ones(30)] * 3)\n"
        "print(json.dumps({'file': fastrms.__file__, **fastrms.kernels.cache_stats()}))"
    )
    runs = []
    for target in ("one", "two"):
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
        pip += ["--target", str(tmp_path / target)]
        done = subprocess.run([*pip, str(wheel)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(tmp_path / target))
        out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["file"].startswith(str(tmp_path / "one")) and second["file"].startswith(str(tmp_path / "two"))
    assert first["misses"] > 0 and first["compiled"]
    assert second["misses"] == 0 and second["compiled"] == [] and second["hits"] >= len(first["compiled"]), second
    assert second["folder"] == first["folder"]
