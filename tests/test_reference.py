"""fastrms.reference, the oracle, checked against a scalar transcription of the formula."""

import math

import numpy as np
import pytest

from fastrms import reference
from fastrms.bench.cases import all_variants


def scalar_step(p, g, st, t, lr, beta, eps, o):
    """docs/algorithm.md's update for one float64 element, in plain Python."""
    if o.get("maximize"):
        g = -g
    wd = o.get("weight_decay", 0.0)
    if wd and not o.get("decoupled_weight_decay"):
        g = g + wd * p
    if wd and o.get("decoupled_weight_decay"):
        p = p - (lr * wd) * p
    st["v"] = beta * st["v"] + (1 - beta) * (g * g)
    bc = 1 - beta**t if o.get("bias_correction") else 1.0
    if o.get("centered"):
        st["m"] = beta * st["m"] + (1 - beta) * g
        m_hat = st["m"] / bc
        s = max(st["v"] / bc - m_hat * m_hat, 0.0)
    else:
        s = st["v"] / bc
    d = math.sqrt(s + eps) if o.get("eps_in_sqrt") else math.sqrt(s) + eps
    u = g / d
    mu = o.get("momentum", 0.0)
    if not mu:
        return p - lr * u
    if o.get("lr_in_momentum"):
        st["b"] = mu * st["b"] + lr * u
        return p - (lr * u + mu * st["b"] if o.get("nesterov") else st["b"])
    st["b"] = mu * st["b"] + u
    return p - lr * (u + mu * st["b"] if o.get("nesterov") else st["b"])


@pytest.mark.parametrize("name", all_variants())
def test_reference_follows_the_formula(name):
    o = all_variants()[name]
    rng = np.random.default_rng(1)
    p0, grads = rng.standard_normal(5), [rng.standard_normal(5) for _ in range(3)]
    ref = reference.RMSprop(p0.copy(), 0.01, 0.9, 1e-8, **o)
    for t in range(1, 21):
        ref.step(grads[t % 3])
    for i in range(5):
        st = {"v": o["initial_scale"], "m": 0.0, "b": 0.0}
        p = p0[i]
        for t in range(1, 21):
            p = scalar_step(p, grads[t % 3][i], st, t, 0.01, 0.9, 1e-8, o)
        assert ref.params[0][i] == pytest.approx(p, rel=1e-13, abs=1e-15)


def test_seed_rmsprop_is_the_seed_step_in_a_loop_with_its_decay():
    rng = np.random.default_rng(2)
    target = rng.standard_normal(4)
    theta0 = np.zeros(4)
    got = reference.seed_rmsprop(theta0, 1200, lambda th: th - target)
    theta, v, lr = theta0, np.zeros(4), 0.001
    for t in range(1, 1201):
        theta, v = reference.seed_step(theta, v, theta - target, lr, 0.9, 1e-8)
        if t % 500 == 0:
            lr *= 0.95
    np.testing.assert_array_equal(got, theta)
    assert not np.array_equal(got, theta0) and np.array_equal(theta0, np.zeros(4))


def test_the_rowwise_reference_steps_size_0_params_as_the_optimizer_does():
    import fastrms

    shapes = [(0, 3), (0,), (2, 0), (3,)]
    fast = fastrms.RMSprop([np.ones(s, np.float32) for s in shapes], 0.1, state_layout="rowwise")
    ref = reference.RMSprop([np.ones(s, np.float32) for s in shapes], 0.1, state_layout="rowwise")
    grads = [np.full(s, 0.5, np.float32) for s in shapes]
    fast.step(grads)
    ref.step(grads)
    for a, b, va, st in zip(fast.params, ref.params, fast.square_avg, ref.state):
        assert a.shape == b.shape and a.tobytes() == b.tobytes()
        assert va.tobytes() == st["square_avg"].tobytes()
