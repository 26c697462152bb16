"""The command line: ``fastrms demo`` runs the seed's example and draws its plot."""

import subprocess
import sys

import pytest

from fastrms import cli, demo


def test_demo_prints_matching_thetas(capsys):
    assert cli.main(["demo", "--no-plot"]) == 0
    out = capsys.readouterr().out
    result = demo.run()
    assert f"{result['theta_seed'].ravel()[0]:.12f}" in out
    assert "largest relative difference" in out
    assert result["mse_fitted"] < 0.02 < result["mse_final"]  # the seed's settings stop short; 0.01 fits
    assert f"{result['theta_fitted'].ravel()[1]:.6f}" in out
    assert "the first call took" in out and "us a step" in out  # the first call timed apart from the steady state
    loss, fitted = result["loss"], result["loss_fitted"]
    assert len(loss) == len(fitted) == 1000 and loss[0] == fitted[0] == result["mse_init"]
    assert fitted[-1] < 0.011 < 2.8 < loss[-1] < loss[0]  # the loss panel's two curves


def test_demo_writes_the_seeds_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = subprocess.run(
        [sys.executable, "-m", "fastrms", "demo", "--output", str(tmp_path)], capture_output=True, text=True, check=True
    )
    png = tmp_path / "linear_regression.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert str(png) in out.stdout


def test_a_bare_fastrms_prints_the_help_and_demo_options_alone_run_the_demo(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage: fastrms" in out and "demo" in out and "bench" in out and "info" in out
    assert cli.main(["--no-plot"]) == 0
    assert "linear regression" in capsys.readouterr().out


def test_importing_fastrms_main_runs_nothing(tmp_path):
    """The docs build imports every module: ``fastrms.__main__`` once ran the CLI on import."""
    out = subprocess.run(
        [sys.executable, "-c", "import fastrms.__main__"], capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0 and out.stdout == "" and out.stderr == "" and not list(tmp_path.iterdir())


def _run(*argv, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastrms", *argv], capture_output=True, text=True, cwd=cwd)


@pytest.fixture
def a_file(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    return f


@pytest.mark.parametrize(
    "argv, words",
    [
        (["demo", "--iterations", "-5"], "--iterations"),
        (["demo", "--iterations", "2.5"], "--iterations"),
        (["demo", "--learning-rate", "nan"], "--learning-rate"),
        (["demo", "--learning-rate", "-1"], "--learning-rate"),
        (["demo", "--fitted-learning-rate", "inf"], "--fitted-learning-rate"),
        (["demo", "--output", "{file}/sub"], "--output"),
        (["bench", "--sizes", "-5"], "--sizes"),
        (["bench", "--sizes", "abc"], "--sizes"),
        (["bench", "--rounds", "-1"], "--rounds"),
        (["bench", "--rounds", "0"], "--rounds"),
        (["bench", "--output", "{file}"], "--output"),
        (["bench", "--readme", "{file}", "--quick"], "--readme"),
        (["bench", "--readme", "{tmp}/missing.md"], "--readme"),
        (["bench", "--variants", "adam"], "unknown variant"),
        (["bench", "--dtypes", "float16"], "--dtypes"),
        (["bench", "--readme", "{latin1}"], "not UTF-8"),
        (["bench", "--sizes", "1e15"], "needs about"),
        (["bench", "--sizes", "1e15", "--clipped"], "needs about"),
        (["bench", "--sizes", "1e15", "--dask"], "needs about"),
        (["bench", "--torch", "--sizes", "1000000"], "100 layers of width 1000000 needs about"),
        (["frobnicate"], "invalid choice"),
        (["bench", "--precision", "--accuracy"], "--precision and --accuracy are separate benches"),
        (["bench", "--quick", "--torch"], "--quick is a short sweep"),
        (["bench", "--accuracy", "--beta", "0.999999999", "--output", "{tmp}/acc"], "rounds to 1 in float32"),
    ],
)
def test_a_user_error_is_one_line_on_stderr_and_exit_2_before_any_work(argv, words, a_file, tmp_path):
    latin1 = a_file.parent / "latin1.md"
    latin1.write_bytes("caf\xe9 <!-- bench:start --> <!-- bench:end -->".encode("latin-1"))
    argv = [a.format(file=a_file, tmp=tmp_path, latin1=latin1) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    out = _run(*argv, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("fastrms: error:") and words in out.stderr
    assert out.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing was written
    assert a_file.read_text() == "x"


def test_benches_that_write_no_files_neither_create_nor_check_output(tmp_path):
    for argv in (["bench", "--precision"], ["bench", "--torch"], ["bench", "--cold"]):
        args = cli._parse([*argv, "--output", str(tmp_path / "a-file" / "sub")])
        (tmp_path / "a-file").write_text("x")  # --output could not be a folder: unused, so not an error
        cli._check(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_info_with_a_threading_layer_that_cannot_start_is_one_line_not_a_traceback(tmp_path):
    import os

    env = {**os.environ, "NUMBA_THREADING_LAYER": "bogus"}
    argv = [sys.executable, "-m", "fastrms", "info"]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("fastrms: error:") and "NUMBA_THREADING_LAYER" in out.stderr


def test_first_ahead_is_where_fastrms_stays_ahead_and_the_ratio_at_the_largest_size():
    timings = {2: (1.0, 2.0), 100: (3.0, 2.0), 1000: (1.0, 2.0), 10_000: (1.0, 4.0)}
    assert demo.first_ahead(timings) == (1000, 4.0, 10_000)  # ahead at 2 by chance, behind at 100
    assert demo.first_ahead({2: (2.0, 1.0), 10: (3.0, 1.5)}) == (None, 0.5, 10)
    measured = demo.pull_ahead(sizes=(2, 1000), rounds=1, target=0.0005)
    assert set(measured) == {2, 1000} and all(f > 0 and s > 0 for f, s in measured.values())
