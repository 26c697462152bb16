"""fastrms.functional.rmsprop_step: the pure step. Inputs untouched, bits equal to the
optimizer's and the reference's, out= in place or into other arrays, bad input refused."""

import numpy as np
import pytest
from conftest import BIG, DTYPES, covering, problem

import fastrms
from fastrms import functional, reference, schedules
from fastrms.bench.cases import MAIN, all_variants

VARIANTS = all_variants()


# a covering set of variants and dtypes at a size with a vector body and a tail (every variant
# is checked on the in-place shell by the optimizer's tests); one element for the main variants
CASES = [(name, 1031, case["dtype"]) for name, case in covering(dtype=DTYPES)]
CASES += [(name, 1, dtype) for name in MAIN for dtype in DTYPES]


@pytest.mark.parametrize(
    "name, n, dtype", CASES, ids=[f"{name}-{n}-{np.dtype(dtype).name}" for name, n, dtype in CASES]
)
@pytest.mark.lower_bound
def test_the_pure_step_matches_the_optimizer_and_the_reference_bitwise(name, n, dtype):
    opts = VARIANTS[name] if name in VARIANTS else MAIN[name]
    p0, grads = problem(n, dtype)
    sched = schedules.exponential_decay(0.01, 0.9, 10)
    opt = fastrms.RMSprop(p0.copy(), sched, **opts)
    ref = reference.RMSprop(p0.copy(), sched, **opts)
    param, state = p0.copy(), None
    for t in range(1, 16):
        g = grads[t % 4]
        frozen = (param.copy(), g.copy(), None if state is None else {k: v.copy() for k, v in state.items()})
        new_param, new_state = functional.rmsprop_step(param, g, state, t, sched(t - 1), **opts)
        # inputs untouched
        assert param.tobytes() == frozen[0].tobytes() and g.tobytes() == frozen[1].tobytes()
        if state is not None:
            assert all(state[k].tobytes() == frozen[2][k].tobytes() for k in state)
        param, state = new_param, new_state
        opt.step(g)
        ref.step(g)
    assert param.tobytes() == opt.params.tobytes() == ref.params[0].tobytes()
    for name_ in state:
        assert state[name_].tobytes() == getattr(opt, name_).tobytes()


def test_an_empty_param_gives_empty_outputs(dtype):
    empty = np.zeros((0, 3), dtype)
    param, state = functional.rmsprop_step(empty, empty.copy(), None, 1, 0.01, momentum=0.9, centered=True)
    assert param.shape == (0, 3) and param.dtype == dtype
    assert {k: (v.shape, v.dtype) for k, v in state.items()} == {
        k: ((0, 3), np.dtype(dtype)) for k in ("square_avg", "grad_avg", "momentum_buffer")
    }


def test_out_may_be_the_inputs_themselves_or_other_arrays(dtype):
    p0, grads = problem(BIG, dtype)
    opts = dict(centered=True, momentum=0.9)
    state0 = functional.init_state(p0, **opts)
    a_param, a_state = p0.copy(), {k: v.copy() for k, v in state0.items()}
    b_param, b_state = np.empty_like(p0), {k: np.empty_like(v) for k, v in state0.items()}
    c_param, c_state = functional.rmsprop_step(p0, grads[0], state0, 1, 0.01, **opts)
    r_param, r_state = functional.rmsprop_step(a_param, grads[0], a_state, 1, 0.01, out=(a_param, a_state), **opts)
    assert r_param is a_param and r_state is not None
    functional.rmsprop_step(p0, grads[0], state0, 1, 0.01, out=(b_param, b_state), **opts)
    for x in (a_param, b_param):
        assert x.tobytes() == c_param.tobytes()
    for k in c_state:
        assert a_state[k].tobytes() == b_state[k].tobytes() == c_state[k].tobytes()


def test_state_none_starts_from_initial_scale():
    p, s = functional.rmsprop_step(np.ones(3), np.ones(3), None, 1, 0.1, initial_scale=1.0, momentum=0.5)
    ref = reference.rmsprop_step(
        np.ones(3), np.ones(3), {"square_avg": np.ones(3), "momentum_buffer": np.zeros(3)}, 1, 0.1, momentum=0.5
    )
    assert p.tobytes() == ref.tobytes() and set(s) == {"square_avg", "momentum_buffer"}


def test_skip_nonfinite_returns_the_inputs_values():
    st = functional.init_state(np.ones(3))
    p, s = functional.rmsprop_step(np.ones(3), np.array([1.0, np.nan, 0.0]), st, 1, 0.1, skip_nonfinite=True)
    assert np.all(p == 1) and np.all(s["square_avg"] == 0) and s["square_avg"] is not st["square_avg"]


def _bad_calls():
    p, g = np.ones(4), np.ones(4)
    st = {"square_avg": np.zeros(4)}
    buf, big = np.zeros(4), np.zeros(5)
    return {
        "grad shape": (dict(param=p, grad=np.ones(5), state=st), ValueError, "grad"),
        "grad dtype": (dict(param=p, grad=g.astype(np.float32), state=st), ValueError, "grad"),
        "t = 0": (dict(param=p, grad=g, state=st, t=0), ValueError, "t must be"),
        "t float": (dict(param=p, grad=g, state=st, t=1.0), TypeError, "t must be"),
        "schedule": (dict(param=p, grad=g, state=st, learning_rate=lambda c: 0.1), TypeError, "learning_rate"),
        "missing state": (dict(param=p, grad=g, state={}), ValueError, "square_avg"),
        "extra state": (dict(param=p, grad=g, state={**st, "momentum_buffer": np.zeros(4)}), ValueError, "exactly"),
        "state not a dict": (dict(param=p, grad=g, state=[np.zeros(4)]), TypeError, "dict"),
        "out overlaps grad": (
            dict(param=p, grad=g, state=st, out=(g, {"square_avg": np.zeros(4)})),
            ValueError,
            "grad",
        ),
        "outs overlap": (dict(param=p, grad=g, state=st, out=(buf, {"square_avg": buf})), ValueError, "share memory"),
        "out shifted": (
            dict(param=p, grad=g, state={"square_avg": big[0:4]}, out=(np.zeros(4), {"square_avg": big[1:5]})),
            ValueError,
            "shares memory with state",
        ),
        "bad option": (dict(param=p, grad=g, state=st, alpha=0.9), TypeError, "alpha"),
        "eps rounds to 0": (
            dict(param=p.astype(np.float32), grad=g.astype(np.float32), state=None, epsilon=1e-46),
            ValueError,
            "epsilon",
        ),
    }


@pytest.mark.parametrize("kind", list(_bad_calls()))
def test_bad_input_is_refused_and_nothing_is_written(kind):
    kwargs, exc, match = _bad_calls()[kind]
    kwargs = {"t": 1, "learning_rate": 0.1, **kwargs}
    arrays = [kwargs["param"], kwargs["grad"]]
    if isinstance(kwargs.get("state"), dict):
        arrays += list(kwargs["state"].values())
    if "out" in kwargs:
        arrays += [kwargs["out"][0], *kwargs["out"][1].values()]
    before = [a.tobytes() for a in arrays]
    with pytest.raises(exc, match=match):
        functional.rmsprop_step(**kwargs)
    assert [a.tobytes() for a in arrays] == before


def test_the_pure_step_refuses_a_state_storage_it_does_not_keep():
    p, g = np.ones(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"^rmsprop_step\(\) keeps the state in the params' dtype; state_storage="):
        functional.rmsprop_step(p, g, None, 1, 0.1, state_storage="bfloat16")
    with pytest.raises(ValueError, match=r"^init_state\(\) keeps the state in the params' dtype"):
        functional.init_state(p, state_storage="bfloat16")
    assert p.tolist() == [1.0] * 3
