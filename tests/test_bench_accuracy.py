"""fastrms.bench.accuracy: the precision modes' training runs behind the accuracy study."""

import numpy as np
import pytest

pytest.importorskip("ml_dtypes", reason="ml_dtypes is not installed (pip install ml_dtypes)")

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


def test_the_lean_states_square_avg_is_measured_against_float32s():
    kept = {}
    for mode in ("float32", "bfloat16 state", "8-bit state"):
        accuracy.train(mode, steps=30, kept=kept, beta=0.99)
    assert [a.shape for a in kept["8-bit state"]] == [a.shape for a in kept["float32"]]
    bf16, eight = accuracy.state_error(kept, "bfloat16 state"), accuracy.state_error(kept, "8-bit state")
    assert 0 < bf16[0] <= bf16[1] and 0 < eight[0] <= eight[1]
    assert accuracy.state_error(kept, "float32") == (0.0, 0.0)


def test_bench_accuracy_takes_beta_only_with_accuracy(capsys):
    assert cli.main(["bench", "--beta", "0.5"]) == 2
    assert "--beta goes with --accuracy" in capsys.readouterr().err
    assert cli.main(["bench", "--accuracy", "--beta", "1"]) == 2
    assert "expected a number in [0, 1)" in capsys.readouterr().err
