"""Every front end (fastrms.RMSprop, the pure step, fastrms.dask, fastrms.torch) refuses the
same bad values with a TypeError/ValueError before anything is written; and the numeric
edges (step counts beyond range, schedules that overflow, norms beyond float64) follow one
rule everywhere."""

import importlib.util
import math

import numpy as np
import pytest

import fastrms
from fastrms import functional, reference, schedules

HAS_DASK = importlib.util.find_spec("dask") is not None
HAS_TORCH = importlib.util.find_spec("torch") is not None

#: (options, what the error names); each is refused at construction or at the first step.
BAD = [
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"learning_rate": math.inf}, "learning_rate"),
    ({"beta": 1.0}, "beta"),
    ({"epsilon": 0.0}, "epsilon"),
    ({"momentum": -0.5}, "momentum"),
    ({"learning_rate": lambda count: True}, "schedule returned bool"),
    ({"learning_rate": lambda count: "0.01"}, "schedule returned str"),
    ({"learning_rate": schedules.step_decay(0.1, 1e300, 1)}, "overflowed at count"),
    ({"dense_rows": True, "weight_decay": 0.1}, "dense_rows"),
    ({"centred": True}, "centred"),
]


def _numpy(w, g, opts):
    opt = fastrms.RMSprop(w, **opts)
    for _ in range(3):
        opt.step(g)


def _pure(w, g, opts):
    opts = dict(opts)
    lr = opts.pop("learning_rate", 1e-3)
    state = None
    for t in range(3):
        rate = fastrms.core.options.scheduled_lr(lr, t, 0.0, (w.dtype,)) if callable(lr) else lr
        new, state = functional.rmsprop_step(w, g, state, t + 1, rate, **opts)
        w[...] = new


def _dask(w, g, opts):
    import dask.array as da

    from fastrms.dask import RMSprop

    opt = RMSprop(da.from_array(w, chunks=4), **opts)
    for _ in range(3):
        opt.step(da.from_array(g, chunks=4))
        w[...] = opt.params.compute()


def _torch(w, g, opts):
    import torch

    from fastrms.torch import RMSprop

    names = {"learning_rate": "lr", "beta": "alpha", "epsilon": "eps"}
    given = {names.get(k, k): v for k, v in opts.items()}
    if callable(given.get("lr")) or "dense_rows" in given:
        pytest.skip("torch's optimizer takes a number for lr (a scheduler object changes it) and has no step_rows")
    p = torch.nn.Parameter(torch.from_numpy(w))  # shares w's memory
    opt = RMSprop([p], **given)
    for _ in range(3):
        p.grad = torch.from_numpy(g.copy())
        opt.step()


FRONT_ENDS = {"RMSprop": _numpy, "rmsprop_step": _pure}
if HAS_DASK:
    FRONT_ENDS["fastrms.dask"] = _dask
if HAS_TORCH:
    FRONT_ENDS["fastrms.torch"] = _torch


@pytest.mark.parametrize("front_end", list(FRONT_ENDS))
@pytest.mark.parametrize("opts, words", BAD, ids=[str(sorted(o))[:40] + "-" + w for o, w in BAD])
def test_every_front_end_refuses_the_same_bad_values_with_nothing_written(front_end, opts, words):
    if front_end == "rmsprop_step" and "dense_rows" in opts:
        pytest.skip("the pure step has no rows: dense_rows is an option of step_rows")
    w = np.linspace(-1.0, 1.0, 8)
    g = np.full(8, 0.5)
    before = w.copy()
    torch_words = {"learning_rate": "lr", "beta": "alpha", "epsilon": "eps", "centred": "centred"}
    with pytest.raises((TypeError, ValueError)) as info:
        FRONT_ENDS[front_end](w, g, opts)
    said = str(info.value)
    assert words in said or (front_end == "fastrms.torch" and torch_words.get(words, words) in said), said
    if not any(callable(v) for v in opts.values()):  # a schedule's error comes at a later step
        np.testing.assert_array_equal(w, before)


# ------------------------------------------------------------------ step counts, norms


@pytest.mark.parametrize("count", [2**64, 10**400])
def test_a_step_count_beyond_range_is_refused_at_load_and_in_the_pure_step(count):
    w = np.zeros(4)
    opt = fastrms.RMSprop(w, 1e-3, bias_correction=True)
    opt.step(np.ones(4))
    state = opt.state_dict()
    kept = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    for key in ("step_count", "skipped_steps"):
        bad = dict(state, **{key: count})
        with pytest.raises(ValueError, match=rf"{key}'\] must be an integer <="):
            opt.load_state_dict(bad)
    assert opt.step_count == 1 and all(np.array_equal(state[k], kept[k]) for k in kept)
    opt.step(np.ones(4))  # still steps: nothing was half-loaded
    with pytest.raises(ValueError, match="t must be an integer <="):
        functional.rmsprop_step(np.zeros(4), np.ones(4), None, count, 1e-3, bias_correction=True)


def test_a_schedule_that_overflows_is_a_bad_schedule_value_naming_the_step():
    w = np.zeros(4)
    opt = fastrms.RMSprop(w, schedules.step_decay(0.1, 1e300, 1))
    opt.step(np.ones(4))
    opt.step(np.ones(4))
    kept = w.copy()
    with pytest.raises(ValueError, match="schedule overflowed at count 2"):
        opt.step(np.ones(4))
    assert opt.step_count == 2 and np.array_equal(w, kept)


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip_nonfinite"])
def test_finite_grads_whose_norm_is_beyond_float64_are_clipped_by_one_rule_in_step_and_step_rows(skip):
    g = np.full((4, 2), 1e308)  # finite; the 2-norm (2.8e308) is not
    w_step, w_rows = np.zeros((4, 2)), np.zeros((4, 2))
    a = fastrms.RMSprop(w_step, 1e-3, clip_global_norm=1.0, skip_nonfinite=skip)
    b = fastrms.RMSprop(w_rows, 1e-3, clip_global_norm=1.0, skip_nonfinite=skip)
    a.step(g)
    b.step_rows(np.arange(4), g)
    expected = reference.rmsprop_step(np.zeros((4, 2)), g, {"square_avg": np.zeros((4, 2))}, 1, 1e-3,
                                      clip_global_norm=1.0)  # fmt: skip
    assert a.last_grad_norm == b.last_grad_norm == math.inf
    assert a.skipped_steps == b.skipped_steps == 0  # the grads are finite: stepped, not skipped
    np.testing.assert_array_equal(w_step, expected)
    np.testing.assert_array_equal(w_rows, expected)
    assert np.all(w_step < 0)  # clipped to the max norm, not scaled by 0
    new, _ = functional.rmsprop_step(np.zeros((4, 2)), g, None, 1, 1e-3, clip_global_norm=1.0)
    np.testing.assert_array_equal(new, expected)


def test_a_grad_holding_an_infinity_is_skipped_by_step_and_step_rows_alike():
    g = np.full((4, 2), 1.0)
    g[1, 1] = np.inf
    a = fastrms.RMSprop(np.zeros((4, 2)), 1e-3, clip_global_norm=1.0, skip_nonfinite=True)
    b = fastrms.RMSprop(np.zeros((4, 2)), 1e-3, clip_global_norm=1.0, skip_nonfinite=True)
    a.step(g)
    b.step_rows(np.arange(4), g)
    assert a.skipped_steps == b.skipped_steps == 1 and a.step_count == b.step_count == 0
