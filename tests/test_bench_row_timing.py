"""fastrms.bench.row_timing: the sparse-row cases it times, and its NumPy row step."""

import numpy as np

from fastrms import RMSprop
from fastrms.bench import row_timing


def test_sparse_rows_times_each_case_against_dense_steps():
    times = row_timing.sparse_rows(n=2000, width=8, k=100, distinct=20, batch=10, rounds=1, target=0.001)
    assert len(times) == 12 and all(t > 0 for t in times.values())
    assert "step_rows, 10 distinct rows" in times and "dense step, (10, 8)" in times
    assert "step_rows, 100 rows from 20" in times and "dense step, whole (2000, 8) table" in times
    assert "NumPy, 100 rows from 20" in times


def test_the_numpy_row_step_the_bench_times_is_step_rows_bit_for_bit():
    rng = np.random.default_rng(3)
    table = rng.standard_normal((300, 8)).astype(np.float32)
    opt, mine, state = RMSprop(table.copy(), 1e-3), table.copy(), {"square_avg": np.zeros_like(table)}
    for t in (1, 2, 3):
        rows, grads = rng.integers(0, 300, 500), rng.standard_normal((500, 8)).astype(np.float32)
        opt.step_rows(rows, grads)
        row_timing.numpy_step_rows(mine, state, rows, grads, t, 1e-3)
    np.testing.assert_array_equal(opt.params, mine)
    np.testing.assert_array_equal(opt.square_avg, state["square_avg"])
