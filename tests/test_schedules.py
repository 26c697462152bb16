"""fastrms.schedules: values, composition, and argument checks."""

import math

import pytest

from fastrms import schedules as S


def test_step_decay_is_the_seeds_decay():
    sched = S.step_decay(0.001, 0.95, 500)
    lr, seen = 0.001, []
    for t in range(1, 1501):  # the seed: use lr at step t, then decay after every 500th
        seen.append((sched(t - 1), lr))
        if t % 500 == 0:
            lr *= 0.95
    assert all(a == pytest.approx(b, rel=1e-15) for a, b in seen)
    assert sched(499) == 0.001 and sched(500) == pytest.approx(0.00095)


def test_exponential_decay():
    sched = S.exponential_decay(1.0, 0.5, transition_steps=10)
    assert sched(0) == 1.0 and sched(10) == 0.5 and sched(5) == pytest.approx(0.5**0.5)
    stair = S.exponential_decay(1.0, 0.5, 10, staircase=True)
    assert stair(9) == 1.0 and stair(10) == 0.5
    floor = S.exponential_decay(1.0, 0.5, 1, end=0.2)
    assert floor(10) == 0.2


def test_cosine_decay():
    sched = S.cosine_decay(1.0, 100, alpha=0.1)
    assert sched(0) == 1.0
    assert sched(50) == pytest.approx(0.55)
    assert sched(100) == pytest.approx(0.1) and sched(1000) == pytest.approx(0.1)


def test_linear_warmup_then_another_schedule():
    sched = S.linear_warmup(S.cosine_decay(1.0, 10), warmup_steps=4, start=0.0)
    assert [sched(c) for c in range(4)] == [0.0, 0.25, 0.5, 0.75]
    assert sched(4) == 1.0 and sched(14) == pytest.approx(0.0, abs=1e-15)
    assert S.linear_warmup(2.0, 2)(1) == 1.0


def test_join_schedules_restarts_each_piece():
    sched = S.join_schedules([S.constant(1.0), S.step_decay(0.5, 0.1, 2), lambda c: 7.0], [3, 7])
    assert [sched(c) for c in range(9)] == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.5, 0.05, 0.05, 7.0, 7.0])


def test_schedules_are_immutable_and_readable():
    sched = S.step_decay(0.001)
    assert "step_decay(init=0.001, factor=0.95, every=500)" == repr(sched)
    with pytest.raises(AttributeError):
        sched.init = 1.0
    assert S.step_decay(0.001) == sched and hash(sched) == hash(S.step_decay(0.001))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: S.constant(-1.0), "value"),
        (lambda: S.constant(math.nan), "value"),
        (lambda: S.step_decay(0.1, every=0), "every"),
        (lambda: S.step_decay(0.1, every=2.5), "every"),
        (lambda: S.step_decay(0.1, factor=-0.5), "factor"),
        (lambda: S.exponential_decay(0.1, 0.9, staircase=1), "staircase"),
        (lambda: S.cosine_decay(0.1, 10, alpha=1.5), "alpha"),
        (lambda: S.linear_warmup(0.1, 0), "warmup_steps"),
        (lambda: S.linear_warmup("fast", 3), "then"),
        (lambda: S.join_schedules([0.1, 0.2], []), "boundaries"),
        (lambda: S.join_schedules([0.1, 0.2, 0.3], [5, 5]), "increase"),
        (lambda: S.join_schedules([], []), "at least one"),
    ],
)
def test_bad_arguments_are_refused(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()
