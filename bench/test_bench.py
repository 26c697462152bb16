"""pytest-benchmark suite: one optimizer step of every implementation in the comparison table.

In the normal test run (``--benchmark-disable`` in the pytest configuration) each case runs
once as a test. To time them for real:

    python -m pytest bench --benchmark-enable --benchmark-only --benchmark-group-by=group \
        --benchmark-json=bench-results/pytest-benchmark.json

``fastrms bench`` sweeps more sizes and writes the README table and plot.
"""

from functools import lru_cache

import numpy as np
import pytest

from fastrms.bench import peers as B
from fastrms.bench.cases import MAIN

SIZES = (100, 10_000, 1_000_000, 10_000_000)
BIG = 30_000_000  # the plain variant only: the far end of the sweep
#: The sizes of the normal test run (benchmarks disabled: each case runs once as a test):
#: the big ones only allocate and stream memory there, and `fastrms bench` times them.
TEST_SIZES = (100, 10_000, 1_000_000)


def _cases(sizes, big):
    for variant in MAIN:
        for dtype in ("float32", "float64"):
            for n in sizes + ((big,) if variant == "plain" and big else ()):
                for impl in B.IMPLEMENTATIONS:
                    if not (B.available(impl) and B.has_variant(impl, MAIN[variant])):
                        continue
                    yield pytest.param(impl, variant, dtype, n, id=f"{variant}-{dtype}-{n:.0e}-{impl}")


def pytest_generate_tests(metafunc):
    """Every size when timing (`--benchmark-enable`), the small ones in the normal run."""
    if metafunc.function.__name__ != "test_step":
        return
    timing = metafunc.config.getoption("benchmark_enable") or not metafunc.config.getoption("benchmark_disable")
    cases = _cases(SIZES, BIG) if timing else _cases(TEST_SIZES, None)
    metafunc.parametrize("impl,variant,dtype,n", list(cases))


@lru_cache(maxsize=4)
def _problem(n, dtype, variant):
    return B.Problem(n, dtype, MAIN[variant])


def test_step(benchmark, impl, variant, dtype, n):
    problem = _problem(n, dtype, variant)
    made = B.setup(impl, problem)
    if made is None:
        pytest.skip(f"{impl} declines {dtype} here (JAX computes float64 only with x64 enabled)")
    step, holder = made
    step()  # compile or load from the cache before timing
    benchmark.group = f"{variant} {dtype} n={n:.0e}"
    benchmark.extra_info.update(bytes_per_step=problem.bytes_per_step, impl=impl)
    benchmark(step)
    params = holder.params[0] if isinstance(holder.params, list) else holder.params
    assert params.dtype == np.dtype(dtype) and params.shape == (n,)
