"""Read-only passes over flat arrays: the non-finite check behind `skip_nonfinite` and the
sum of squares behind `clip_global_norm`.

The sum of squares is reproducible: the same bits whatever the thread count and whichever
driver (serial, parallel, one array or a chunk table) ran. Its order is fixed:

- an array is cut into blocks of `BLOCK` elements from its start (the chunk table's
  chunks are these blocks, `fastrms.kernels.CHUNK` is `BLOCK`);
- within a block, each element is converted to float64 and squared, and element `j` of
  each row of `LANES` elements is added to lane `j` in order (a vector loop with no
  reassociation: LLVM vectorises it across lanes, whatever its vector width);
- the lanes are folded in halves: `lane[j] += lane[j + w]` for w = LANES/2, ..., 1;
- block sums are added one after another, from 0.0, in the order of the blocks (and of the
  arrays, in a chunk table).

`fastrms.reference.global_norm` computes the same sum in NumPy, bit for bit.
"""

import numpy as np
from numba import njit, prange

from ._jit import jit, name

#: Elements per block of the sum of squares (and per chunk of a chunk table).
BLOCK = 1 << 15
#: Lanes of a block's float64 partial sums.
LANES = 1024


def _make_nonfinite(parallel):
    """Whether a float array holds a NaN or an infinity: `x - x` is 0 exactly when `x` is
    finite (no fastmath, so LLVM may not fold it), counted with an integer sum that
    vectorises. The array is only read."""

    def nonfinite(a):
        zero = a.dtype.type(0.0)
        count = 0
        for i in prange(a.size):
            x = a[i]
            count += 1 if x - x != zero else 0
        return count > 0

    name(nonfinite, f"nonfinite_{'parallel' if parallel else 'serial'}")
    return jit(parallel)(nonfinite)


#: `nonfinite_serial(a)` / `nonfinite_parallel(a)`: True if the 1-D float array `a`
#: holds a NaN or +-Inf.
nonfinite_serial, nonfinite_parallel = _make_nonfinite(False), _make_nonfinite(True)


@njit(inline="always")
def block_sumsq(a):
    """The float64 sum of squares of `a` (at most `BLOCK` elements), in the module's
    fixed order. NaN or infinity in `a` gives NaN or infinity."""
    lanes = np.zeros(LANES)
    rows = a.size // LANES
    for r in range(rows):
        row = a[r * LANES : (r + 1) * LANES]
        for j in range(LANES):
            x = np.float64(row[j])
            lanes[j] += x * x
    tail = a[rows * LANES :]
    for j in range(tail.size):
        x = np.float64(tail[j])
        lanes[j] += x * x
    w = LANES
    while w > 1:
        w //= 2
        for j in range(w):
            lanes[j] += lanes[j + w]
    return lanes[0]


def _make_sumsq(parallel):
    """The float64 sum of squares of a 1-D float array, block by block (read-only)."""

    def sumsq(a):
        n = a.size
        blocks = (n + BLOCK - 1) // BLOCK
        partial = np.empty(blocks)
        for b in prange(blocks):
            partial[b] = block_sumsq(a[b * BLOCK : min(n, (b + 1) * BLOCK)])
        total = 0.0
        for b in range(blocks):
            total += partial[b]
        return total

    name(sumsq, f"sumsq_{'parallel' if parallel else 'serial'}")
    return jit(parallel)(sumsq)


#: `sumsq_serial(a)` / `sumsq_parallel(a)`: the float64 sum of squares of the 1-D float
#: array `a`, the same bits from both.
sumsq_serial, sumsq_parallel = _make_sumsq(False), _make_sumsq(True)
