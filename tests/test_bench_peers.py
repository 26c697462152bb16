"""fastrms.bench.peers: every implementation in the comparison table computes what it claims.

The same table drives bench/ (pytest-benchmark) and ``fastrms bench``, so a peer that
computed something else would make the published ratios meaningless."""

import numpy as np
import pytest

from fastrms import reference
from fastrms.bench import peers as B
from fastrms.bench.cases import ALL, MAIN

RMS_IMPLEMENTATIONS = [name for name in B.IMPLEMENTATIONS if name != "traffic"]
#: Implementations that run the same formula in the same order as the reference: bitwise equal.
EXACT = {"fastrms", "numpy_seed", "bespoke"}


def _reference_after(problem, steps):
    p, g = problem.fresh()
    ref = reference.RMSprop(p, **problem.hyper)
    for _ in range(steps):
        ref.step(g)
    return ref


@pytest.mark.parametrize("variant", ALL)
@pytest.mark.parametrize("name", RMS_IMPLEMENTATIONS)
def test_each_implementation_computes_the_variant(name, variant, dtype):
    problem = B.Problem(5000, dtype, ALL[variant])
    if not B.available(name):
        pytest.skip(f"{name} is not installed here")
    made = B.setup(name, problem)
    if made is None:  # only a library without the variant (or, JAX, without x64 for float64) declines
        assert name in B.LIBRARY and (not B.has_variant(name, problem.options) or name == "jax_optax")
        return
    step, holder = made
    for _ in range(5):
        step()
    want = _reference_after(problem, 5).params[0]
    got = holder.params[0] if isinstance(holder.params, list) else holder.params
    if name in EXACT:
        np.testing.assert_array_equal(got, want)
    else:
        tol = dict(rtol=1e-12, atol=1e-14) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got, want, **tol)


def test_every_benchmarked_variant_has_a_bespoke_loop_so_the_limit_is_known():
    for variant, options in ALL.items():
        assert B.setup("bespoke", B.Problem(10, np.float32, options)) is not None, variant


def test_supports_reads_the_options_table():
    assert B.supports("torch", {"momentum": 0.9, "centered": True, "maximize": True})
    assert not B.supports("torch", {"nesterov": True})
    assert B.supports("torch", {"nesterov": False})  # at its default: nothing to spell
    assert B.supports("optax", {"nesterov": True, "bias_correction": True})
    assert not B.supports("optax", {"weight_decay": 0.01})


@pytest.mark.parametrize("variant", MAIN)
def test_the_traffic_kernel_reads_and_writes_every_array_once(variant, dtype):
    problem = B.Problem(1000, dtype, MAIN[variant])
    p0, g0 = problem.fresh()
    step, holder = B.setup("traffic", problem)
    step()
    # values rotate param -> square_avg (-> grad_avg -> momentum_buffer); param gets
    # max(grad, the last state's old value), which is 0 at the start
    np.testing.assert_array_equal(holder.params, np.maximum(g0, 0.0))
    np.testing.assert_array_equal(holder.state["square_avg"], p0)
    assert len(holder.state) == problem.state_arrays
    assert problem.bytes_per_step == 1000 * np.dtype(dtype).itemsize * (3 + 2 * problem.state_arrays)


def test_bytes_per_step_of_the_plain_float32_step_is_20_per_element():
    assert B.Problem(10, np.float32).bytes_per_step == 200
    assert B.Problem(10, np.float32, MAIN["centered_momentum"]).bytes_per_step == 360
