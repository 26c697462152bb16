"""`fastrms bench --sparse`: `step_rows` on an embedding table against dense steps, a NumPy
row step, and the kernels that move the same rows with no math (the row step's limit)."""

import numpy as np
from numba import njit, prange

from .. import kernels, reference
from ..kernels.prefetch import prefetch_rows
from ..kernels.rows import AHEAD, BLOCK
from ..optimizer import RMSprop
from .timing import measure_calls


def sparse_rows(n=1_000_000, width=64, k=10_000, distinct=2_000, batch=512, rounds=7, target=0.05, seed=0):
    """`fastrms bench --sparse`: `step_rows` on a `(n, width)` float32 table against
    dense steps, in one process: `{case: seconds}` for k random rows, k indices drawn from
    `distinct` rows (duplicates summed), each in the lazy and the dense-equivalent mode,
    a dense step over a `(k, width)` and a `(distinct, width)` array, a dense step over
    the whole table, the traffic limits (the same memory moved with no arithmetic) of
    the distinct rows and of the duplicates, the lazy rule in NumPy
    (`numpy_step_rows`) on both batches, and a small batch of `batch` random rows
    (one thread: under `fastrms.kernels.PARALLEL_MIN_BYTES`) against a dense step
    over a `(batch, width)` array."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((n, width)).astype(np.float32)
    rows = rng.choice(n, k, replace=False)
    dup_rows = rng.choice(rng.choice(n, distinct, replace=False), k, replace=True)
    grad_rows = rng.standard_normal((k, width)).astype(np.float32)
    lazy = RMSprop(table, 1e-3)
    dense_mode = RMSprop(table.copy(), 1e-3, dense_rows=True)
    small, small_grad = rng.standard_normal((k, width)).astype(np.float32), grad_rows.copy()
    few, few_grad = small[:distinct].copy(), grad_rows[:distinct].copy()
    little, little_grad = small[:batch].copy(), grad_rows[:batch].copy()
    batch_rows, batch_grad = rows[:batch].copy(), grad_rows[:batch].copy()
    small_opt, few_opt, little_opt = RMSprop(small, 1e-3), RMSprop(few, 1e-3), RMSprop(little, 1e-3)
    whole = RMSprop(table.copy(), 1e-3)
    numpy_opt = table.copy(), {"square_avg": np.zeros_like(table)}  # the NumPy rule's table and state
    whole_grad = rng.standard_normal((n, width)).astype(np.float32)
    flat_p, flat_v, flat_g = lazy.params.reshape(-1), lazy.square_avg.reshape(-1), grad_rows.reshape(-1)
    rows64 = rows.astype(np.int64)
    # the duplicates grouped by distinct row, positions in the order given (setup, untimed)
    distinct_rows, counts = np.unique(dup_rows, return_counts=True)
    groups = np.argsort(np.searchsorted(distinct_rows, dup_rows), kind="stable").astype(np.int64)
    start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    scratch = np.empty(distinct_rows.size * width, np.float32)
    steps = {
        f"step_rows, {k} distinct rows": lambda: lazy.step_rows(rows, grad_rows),
        f"step_rows, {k} distinct rows, dense_rows": lambda: dense_mode.step_rows(rows, grad_rows),
        f"step_rows, {k} rows from {distinct}": lambda: lazy.step_rows(dup_rows, grad_rows),
        f"dense step, ({k}, {width})": lambda: small_opt.step(small_grad),
        f"dense step, ({distinct}, {width})": lambda: few_opt.step(few_grad),
        f"dense step, whole ({n}, {width}) table": lambda: whole.step(whole_grad),
        f"traffic limit: the same {k} rows moved, no math": lambda: _row_traffic(flat_p, flat_v, flat_g, rows64, width),
        f"traffic limit: {k} rows summed into {distinct}, no math": lambda: _summed_row_traffic(
            flat_p, flat_v, flat_g, distinct_rows.astype(np.int64), start, groups, scratch, width
        ),
        f"NumPy, {k} distinct rows": lambda: numpy_step_rows(*numpy_opt, rows, grad_rows, 1, 1e-3),
        f"NumPy, {k} rows from {distinct}": lambda: numpy_step_rows(*numpy_opt, dup_rows, grad_rows, 1, 1e-3),
        f"step_rows, {batch} distinct rows": lambda: lazy.step_rows(batch_rows, batch_grad),
        f"dense step, ({batch}, {width})": lambda: little_opt.step(little_grad),
    }
    return measure_calls(steps, rounds, target)


def numpy_step_rows(table, state, rows, grad_rows, t, lr):
    """The lazy `step_rows` in NumPy, the plain variant: duplicates summed in the order given
    (`np.unique`, `np.add.at`), then `fastrms.reference.rmsprop_step` on the
    gathered rows, written back."""
    unique, inverse = np.unique(rows, return_inverse=True)
    summed = np.zeros((unique.size, table.shape[1]), table.dtype)
    np.add.at(summed, inverse, grad_rows)
    sub = {name: a[unique] for name, a in state.items()}
    table[unique] = reference.rmsprop_step(table[unique], summed, sub, t, lr)
    for name, a in sub.items():
        state[name][unique] = a


@njit(inline="always")
def _touch_rows(param, square_avg, rows, lo, hi, width, src):
    """Read and write p and v of rows `rows[lo:hi]`, adding `src[s * width : (s + 1) *
    width] * 0` (no arithmetic to speak of), with the row `AHEAD` on prefetched and whole
    arrays indexed with unsigned indices, as the row shells do (`fastrms.kernels.rows`)."""
    zero, w = param.dtype.type(0.0), np.uint64(width)
    for s in range(lo, hi):
        if s + AHEAD < hi:
            prefetch_rows(param, rows[s + AHEAD] * width, width)
            prefetch_rows(square_avg, rows[s + AHEAD] * width, width)
        a0, g0 = np.uint64(rows[s]) * w, np.uint64(s) * w
        for j in range(w):
            x = src[g0 + j] * zero
            param[a0 + j] = param[a0 + j] + x
            square_avg[a0 + j] = square_avg[a0 + j] + x


@kernels.jit(parallel=True)  # the kernels' options and their cache (keyed on this file too)
def _row_traffic(param, square_avg, grad_rows, rows, width):
    """The bytes of a plain `step_rows` with no arithmetic to speak of: read p, g and v of
    each named row, write p and v (in blocks of rows, as the `rows` shell)."""
    for block in prange((rows.size + BLOCK - 1) // BLOCK):
        _touch_rows(param, square_avg, rows, block * BLOCK, min((block + 1) * BLOCK, rows.size), width, grad_rows)


@kernels.jit(parallel=True)
def _summed_row_traffic(param, square_avg, grad_rows, rows, start, order, scratch, width):
    """The bytes of `step_rows` with duplicates, no arithmetic to speak of: read every grad
    row (grouped by distinct row, `order[start[s]:start[s+1]]`) into a sum, then read and
    write p and v of each distinct row once."""
    w = np.uint64(width)
    for block in prange((rows.size + BLOCK - 1) // BLOCK):
        lo, hi = block * BLOCK, min((block + 1) * BLOCK, rows.size)
        for s in range(lo, hi):
            a = np.uint64(s) * w
            for j in range(w):
                scratch[a + j] = 0
            for m in range(start[s], start[s + 1]):
                g = np.uint64(order[m]) * w
                for j in range(w):
                    scratch[a + j] += grad_rows[g + j]
        _touch_rows(param, square_avg, rows, lo, hi, width, scratch)
