"""fastrms.clock: the learning rate, kernel scalars and counts of a step."""

import math

import numpy as np
import pytest

from fastrms import options
from fastrms.clock import Clock


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
        assert s.lr == 0.1 / t and clock.pending_lr == 0.1 / t
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


def test_advance_with_records_the_rate_a_front_end_used():
    clock = Clock(_options(), (np.dtype(np.float32),), step_count=3, skipped_steps=2)
    clock.advance_with(0.5)
    assert (clock.step_count, clock.skipped_steps, clock.last_lr) == (4, 2, 0.5)
