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


def test_the_pytest_benchmark_suite_times_every_implementation_beside_both_limits():
    """bench/test_bench.py, as `--benchmark-enable` collects it: every available implementation
    that has the variant, at every size and dtype, and in every group both limit kernels (the
    same-traffic kernel and the bespoke loop), so each timing has its limit beside it."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "test_bench.py").is_file():
        pytest.skip("no bench/ folder beside the tests")
    args = ["bench", "--collect-only", "-q", "--benchmark-enable", "-p", "no:cacheprovider"]
    out = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ids = {line.split("[", 1)[1].rstrip("]") for line in out.stdout.splitlines() if "test_step[" in line}
    groups: dict = {}
    for case in ids:
        variant, dtype, n, impl = case.split("-", 3)
        groups.setdefault((variant, dtype, float(n)), set()).add(impl)
    sizes = {1e2, 1e4, 1e6, 1e7}
    assert {(v, d, n) for v in MAIN for d in ("float32", "float64") for n in sizes} <= set(groups)
    for (variant, dtype, n), impls in groups.items():
        assert {"fastrms", "traffic", "bespoke", "numpy_seed"} <= impls, (variant, dtype, n)
        want = {i for i in B.IMPLEMENTATIONS if B.available(i) and B.has_variant(i, MAIN[variant])}
        assert impls == want, (variant, dtype, n)
