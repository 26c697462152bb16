"""Property tests: random variants, hyperparameters, dtypes and sizes.

- the optimizer matches fastrms.reference bit for bit;
- the serial and parallel drivers give identical bits;
- invalid input raises and leaves params and state bitwise unchanged.
"""

import numpy as np
import pytest
from conftest import assert_same_state, assert_unchanged, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastrms
from fastrms import kernels, reference

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configs(draw):
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9, draw(st.floats(0.0, 0.99))]))
    opts = dict(
        learning_rate=draw(st.floats(0.0, 0.5)),
        beta=draw(st.floats(0.0, 0.999)),
        epsilon=draw(st.floats(1e-10, 1e-2)),
        momentum=momentum,
        centered=draw(st.booleans()),
        nesterov=momentum > 0 and draw(st.booleans()),
        lr_in_momentum=draw(st.booleans()),
        weight_decay=draw(st.sampled_from([0.0, draw(st.floats(0.0, 0.2))])),
        decoupled_weight_decay=draw(st.booleans()),
        maximize=draw(st.booleans()),
        bias_correction=draw(st.booleans()),
        eps_in_sqrt=draw(st.booleans()),
        initial_scale=draw(st.sampled_from([0.0, 1.0, draw(st.floats(0.0, 2.0))])),
    )
    return opts, draw(st.sampled_from([np.float32, np.float64])), draw(st.integers(0, 3000)), draw(st.integers(1, 12))


@SETTINGS
@given(configs(), st.integers(0, 2**32 - 1))
def test_random_configurations_match_the_reference_bitwise(config, seed):
    opts, dtype, n, steps = config
    rng = np.random.default_rng(seed)
    p0 = (rng.standard_normal(n) * rng.uniform(0.01, 10)).astype(dtype)
    grads = [(rng.standard_normal(n) * rng.uniform(0.01, 10)).astype(dtype) for _ in range(3)]
    lr = opts.pop("learning_rate")
    fast = fastrms.RMSprop(p0.copy(), lr, **opts)
    ref = reference.RMSprop(p0.copy(), lr, **opts)
    for t in range(steps):
        fast.step(grads[t % 3])
        ref.step(grads[t % 3])
    assert_same_state(fast, ref)


@SETTINGS
@given(
    st.booleans(),
    st.sampled_from([0, 1, 2]),
    st.sampled_from([0, 1, 2]),
    st.booleans(),
    st.sampled_from([np.float32, np.float64]),
    st.integers(0, 70_000),
    st.integers(0, 2**32 - 1),
)
def test_serial_and_parallel_drivers_agree_bitwise(centered, wd, mom, nesterov, dtype, n, seed):
    serial, parallel = kernels.drivers(centered, wd, mom, nesterov and mom > 0)
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(n).astype(dtype) for _ in range(5)]
    arrays[2] = np.abs(arrays[2])
    a, b = [x.copy() for x in arrays], [x.copy() for x in arrays]
    scalars = (
        rng.uniform(0, 0.1),
        rng.uniform(0, 0.999),
        0.0,
        1e-8,
        rng.uniform(0, 0.1),
        0.9,
        -1.0,
        rng.uniform(0.1, 1),
    )
    serial(*a, *scalars)
    parallel(*b, *scalars)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


BAD_OPTIONS = st.one_of(
    st.fixed_dictionaries({"learning_rate": st.one_of(st.floats(max_value=-1e-12), st.just(float("nan")))}),
    st.fixed_dictionaries(
        {"beta": st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-12), st.just(float("inf")))}
    ),
    st.fixed_dictionaries({"epsilon": st.one_of(st.floats(max_value=0.0), st.just(float("nan")))}),
    st.fixed_dictionaries({"momentum": st.floats(max_value=-1e-12)}),
    st.fixed_dictionaries({"weight_decay": st.one_of(st.floats(max_value=-1e-12), st.just(float("inf")))}),
    st.fixed_dictionaries({"nesterov": st.just(True), "momentum": st.just(0.0)}),
    st.fixed_dictionaries({"centered": st.one_of(st.integers(), st.text(max_size=3), st.none())}),
)


@SETTINGS
@given(BAD_OPTIONS)
def test_bad_hyperparameters_always_raise(options):
    with pytest.raises((TypeError, ValueError)):
        fastrms.RMSprop(np.ones(3), **options)


@SETTINGS
@given(
    st.sampled_from([np.float32, np.float64]),
    st.integers(2, 50),  # a 1-element strided view is C-contiguous, and rightly accepted
    st.sampled_from(["dtype", "shape", "overlap", "noncontig", "type"]),
)
def test_bad_grads_always_raise_and_change_nothing(dtype, n, kind):
    p = np.linspace(-1, 1, n).astype(dtype)
    opt = fastrms.RMSprop(p, 0.1, momentum=0.9, centered=True)
    opt.step(np.full(n, 0.25, dtype))
    before = snapshot(opt)
    other = np.float64 if dtype == np.float32 else np.float32
    bad = {
        "dtype": np.ones(n, other),
        "shape": np.ones(n + 1, dtype),
        "overlap": p,
        "noncontig": np.ones(2 * n, dtype)[::2],
        "type": list(range(n)),
    }[kind]
    with pytest.raises((TypeError, ValueError)):
        opt.step(bad)
    assert_unchanged(opt, before)
