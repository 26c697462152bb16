"""fastrms.rmsprop, the seed article's function, on the seed's own example."""

import numpy as np
import pytest

import fastrms
from fastrms import demo, reference, schedules


def test_seed_linear_regression_returns_the_seeds_numbers():
    X, y, X_b, theta_init = demo.make_data()
    keep = theta_init.copy()

    def grad(theta):
        return demo.compute_gradient(theta, X_b, y)

    got = fastrms.rmsprop(theta_init, 1000, grad)
    want = reference.seed_rmsprop(theta_init, 1000, grad)
    assert got.shape == (2, 1) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(theta_init, keep)  # the caller's array is untouched
    assert not np.allclose(got, theta_init)


def test_the_decay_is_applied_and_configurable():
    target = np.linspace(5, 9, 5)  # far enough that 1200 small steps do not reach it

    def grad(theta):
        return theta - target

    start = np.zeros(5)
    seed = fastrms.rmsprop(start, 1200, grad)
    assert np.array_equal(seed, fastrms.rmsprop(start, 1200, grad, decay_every=500, decay_factor=0.95))
    np.testing.assert_allclose(seed, reference.seed_rmsprop(start, 1200, grad), rtol=1e-12)
    flat = fastrms.rmsprop(start, 1200, grad, decay_every=None)
    assert not np.array_equal(seed, flat)
    same = fastrms.rmsprop(start, 1200, grad, schedules.step_decay(0.001, 0.95, 500))
    assert np.array_equal(seed, same)


def test_options_reach_the_optimizer_and_float32_stays_float32():
    target = np.linspace(-1, 1, 5).astype(np.float32)
    out = fastrms.rmsprop(
        np.zeros(5, np.float32), 300, lambda th: (th - target).astype(np.float64), 0.05, momentum=0.9, centered=True
    )
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, target, atol=0.05)


def test_lists_are_accepted_and_zero_iterations_copy():
    out = fastrms.rmsprop([1.0, 2.0], 0, lambda th: th)
    assert isinstance(out, np.ndarray) and out.tolist() == [1.0, 2.0]


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((np.ones(2, np.int64), 10, lambda t: t), TypeError, "theta"),
        ((np.ones(2), -1, lambda t: t), ValueError, "num_iterations"),
        ((np.ones(2), 1.5, lambda t: t), TypeError, "num_iterations"),
        ((np.ones(2), 10, "grad"), TypeError, "calculate_gradient"),
        ((np.ones(2), 10, lambda t: np.ones(3)), ValueError, "shape"),
        ((np.ones(2), 10, lambda t: np.array(["a", "b"])), TypeError, "real array"),
        ((np.ones(2), 10, lambda t: t, -0.1), ValueError, "learning_rate|init"),
    ],
)
def test_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        fastrms.rmsprop(*args)


def test_errors_name_what_the_caller_passed():
    with pytest.raises(TypeError, match="theta"):
        fastrms.rmsprop(np.ma.array([1.0, 2.0]), 3, lambda th: th)
    with pytest.raises(TypeError, match="theta"):
        fastrms.rmsprop(np.array(["a"]), 3, lambda th: th)
    with pytest.raises(ValueError, match=r"calculate_gradient\(theta\) at iteration 0 returned shape \(3,\)"):
        fastrms.rmsprop(np.zeros(2), 3, lambda th: np.ones(3))
    with pytest.raises(TypeError, match=r"calculate_gradient\(theta\) at iteration 0 must return a real array"):
        fastrms.rmsprop(np.zeros(2), 3, lambda th: np.array(["x", "y"]))
    with pytest.raises(TypeError, match="masked"):
        fastrms.rmsprop(np.zeros(2), 3, lambda th: np.ma.array(th))


def test_a_callback_that_returns_theta_itself_is_used_as_a_gradient():
    got = fastrms.rmsprop(np.ones(2), 3, lambda th: th, decay_every=None)
    want = np.ones(2)
    v = np.zeros(2)
    for _ in range(3):
        want, v = reference.seed_step(want, v, want.copy(), 0.001, 0.9, 1e-8)
    np.testing.assert_array_equal(got, want)
