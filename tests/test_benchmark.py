"""fastrms.benchmark: every implementation in the comparison table computes what it claims.

The same table drives bench/ (pytest-benchmark) and ``fastrms bench``, so a peer that
computed something else would make the published ratios meaningless."""

import numpy as np
import pytest

from fastrms import benchmark as B
from fastrms import reference
from fastrms.cases import MAIN

RMS_IMPLEMENTATIONS = [name for name in B.IMPLEMENTATIONS if name != "traffic"]


def _reference_after(problem, steps):
    p, g = problem.fresh()
    ref = reference.RMSprop(p, **problem.hyper)
    for _ in range(steps):
        ref.step(g)
    return ref


@pytest.mark.parametrize("variant", MAIN)
@pytest.mark.parametrize("name", RMS_IMPLEMENTATIONS)
def test_each_implementation_computes_the_variant(name, variant, dtype):
    problem = B.Problem(5000, dtype, MAIN[variant])
    if not B.available(name):
        pytest.skip(f"{name} is not installed")
    made = B.setup(name, problem)
    if made is None:
        assert name == "torch_foreach" and not B.torch_supports(problem.options)
        return
    step, holder = made
    for _ in range(5):
        step()
    want = _reference_after(problem, 5).params[0]
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    got = holder.params[0] if isinstance(holder.params, list) else holder.params
    np.testing.assert_allclose(got, want, **tol)


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


def test_measure_returns_a_positive_median_for_each_available_implementation():
    res = B.measure(B.Problem(1000, np.float32), ["fastrms", "numpy_seed", "traffic"], rounds=3, target=0.002)
    assert set(res) == {"fastrms", "numpy_seed", "traffic"} and all(v > 0 for v in res.values())


def test_machine_names_cpu_and_versions():
    info = B.machine()
    assert {"cpu", "cores", "threads", "numpy", "numba", "python"} <= info.keys()


def test_crossover_times_both_drivers_on_the_same_arrays():
    rows, first = B.crossover({}, "float32", sizes=(1024, 4096), rounds=1)
    assert [r[0] for r in rows] == [1024, 4096] and [r[1] for r in rows] == [20480, 81920]
    assert all(s > 0 and p > 0 for _, _, s, p in rows)
    assert first in (None, 1024, 4096)
