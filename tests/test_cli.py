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


def test_demo_writes_the_seeds_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = subprocess.run(
        [sys.executable, "-m", "fastrms", "demo", "--output", str(tmp_path)], capture_output=True, text=True, check=True
    )
    png = tmp_path / "linear_regression.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert str(png) in out.stdout


def test_no_subcommand_runs_the_demo(capsys):
    assert cli.main(["--no-plot"]) == 0
    assert "linear regression" in capsys.readouterr().out
