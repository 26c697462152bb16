"""fastrms.bench.accuracy: the precision modes' training runs behind the accuracy study."""

import numpy as np
import pytest

pytest.importorskip("ml_dtypes", reason="ml_dtypes is not installed (pip install 'fastrms[bfloat16]')")

from fastrms import cli
from fastrms.bench import accuracy


def test_the_gradients_are_the_losss_derivatives():
    """The hand-written backward pass against central differences in float64."""
    x, y, start = accuracy._problem()
    x, y = x[:64].astype(np.float64), y[:64].astype(np.float64)
    weights = [w.astype(np.float64) for w in start]
    weights[1] = np.full(weights[1].shape, 0.1)
    _, grads = accuracy._loss_and_grads(weights, x, y)
    for k, idx in ((0, (3, 5)), (1, (7,)), (2, (11, 0))):
        bumped = [w.copy() for w in weights]
        bumped[k][idx] += 1e-6
        up = accuracy._loss_and_grads(bumped, x, y)[0]
        bumped[k][idx] -= 2e-6
        down = accuracy._loss_and_grads(bumped, x, y)[0]
        assert grads[k][idx] == pytest.approx((up - down) / 2e-6, rel=1e-5, abs=1e-9)


def test_a_master_keeps_the_updates_that_rounding_to_bfloat16_loses():
    losses = accuracy.study(steps=100)
    assert set(losses) == set(accuracy.MODES) and all(len(c) == 101 for c in losses.values())
    full = losses["float32"]
    assert full[-1] < 0.6 * full[0]  # it trains
    assert losses["bfloat16 state"][-1] == pytest.approx(full[-1], rel=0.02)
    assert losses["8-bit state"][-1] == pytest.approx(full[-1], rel=0.05)
    assert losses["bfloat16 + master"][-1] == pytest.approx(full[-1], rel=0.05)
    assert losses["bfloat16, no master"][-1] > 1.5 * full[-1]  # updates below half a bfloat16 step are lost
    assert losses["bfloat16, stochastic"][-1] == pytest.approx(full[-1], rel=0.1)  # and kept on average


def test_bench_accuracy_prints_each_mode_and_writes_its_plot(tmp_path, capsys):
    assert cli.main(["bench", "--accuracy", "--steps", "3", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(mode in out for mode in accuracy.MODES) and "bytes/param" in out
    pytest.importorskip("matplotlib", reason="matplotlib is not installed: no plot")
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="mode must be one of"):
        accuracy.train("fp8")
