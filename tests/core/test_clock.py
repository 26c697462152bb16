"""fastrms.core.clock: the learning rate, kernel scalars and counts of a step."""

import math

import numpy as np
import pytest

from fastrms.core import guard, options
from fastrms.core.clock import Clock


def _options(**given):
    return options.resolve(given)


def test_a_constant_rate_gives_its_scalars_and_counts_steps():
    clock = Clock(_options(learning_rate=0.01), (np.dtype(np.float32),))
    assert clock.lr() == 0.01 and clock.last_lr is None
    first = clock.scalars()
    assert first == options.scalars(_options(learning_rate=0.01), 0.01, 1)
    clock.advance()
    assert (clock.step_count, clock.skipped_steps, clock.last_lr) == (1, 0, 0.01)
    assert clock.scalars() is first  # nothing the scalars depend on changed: not rebuilt
    clock.skip()
    assert (clock.step_count, clock.skipped_steps) == (1, 1)


def test_a_schedule_is_called_with_the_steps_already_taken():
    seen = []

    def schedule(count):
        seen.append(count)
        return 0.1 / (1 + count)

    clock = Clock(_options(learning_rate=schedule), (np.dtype(np.float64),))
    for t in range(1, 5):
        s = clock.scalars()
        assert s.lr == 0.1 / t
        clock.advance()
        assert clock.last_lr == 0.1 / t
    assert seen == [0, 1, 2, 3]
    assert clock.schedule is schedule


def test_a_skipped_step_does_not_move_the_schedule():
    clock = Clock(_options(learning_rate=lambda count: 1.0 / (1 + count)), (np.dtype(np.float64),))
    clock.scalars()
    clock.skip()
    assert clock.lr() == 1.0 and clock.step_count == 0 and clock.last_lr is None


def test_bias_correction_rebuilds_the_scalars_every_step():
    hyper = _options(learning_rate=0.01, beta=0.5, bias_correction=True)
    clock = Clock(hyper, (np.dtype(np.float64),))
    for t in range(1, 4):
        assert clock.scalars() == options.scalars(hyper, 0.01, t)
        assert clock.scalars().bias_correction == 1.0 - 0.5**t
        clock.advance()


@pytest.mark.parametrize("bad", [math.nan, -1.0, "0.1", True])
def test_a_bad_scheduled_value_is_refused_naming_the_count(bad):
    clock = Clock(_options(learning_rate=lambda count: bad), (np.dtype(np.float32),), step_count=7)
    with pytest.raises((TypeError, ValueError), match="count 7"):
        clock.scalars()
    assert clock.step_count == 7 and clock.last_lr is None


def test_take_runs_the_step_with_the_clipped_scalars_then_counts_it():
    hyper = _options(learning_rate=lambda count: 0.1 / (1 + count))
    clock = Clock(hyper, (np.dtype(np.float64),), step_count=3, skipped_steps=2)
    seen = []
    assert clock.take(guard.Verdict(True, 10.0, 0.25), seen.append)
    assert seen == [options.scalars(hyper, 0.1 / 4, 4)._replace(grad_scale=0.25)]
    assert (clock.step_count, clock.skipped_steps, clock.last_lr) == (4, 2, 0.1 / 4)
    assert clock.take(guard.GO, seen.append) and seen[-1].grad_scale == 1.0 and seen[-1].lr == 0.1 / 5


def test_take_counts_a_refused_step_and_runs_nothing():
    clock = Clock(_options(), (np.dtype(np.float32),), step_count=3)
    assert not clock.take(guard.SKIP, lambda scalars: pytest.fail("a refused step ran"))
    assert (clock.step_count, clock.skipped_steps, clock.last_lr) == (3, 1, None)


def test_take_counts_nothing_when_the_write_raises():
    clock = Clock(_options(learning_rate=lambda count: 0.5), (np.dtype(np.float32),))

    def bad_row(scalars):
        raise ValueError("rows[0] = 9 is outside [0, 3)")

    with pytest.raises(ValueError, match="outside"):
        clock.take(guard.GO, bad_row)
    assert (clock.step_count, clock.skipped_steps, clock.last_lr) == (0, 0, None)
