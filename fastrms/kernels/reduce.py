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

Each pass reads its array through a codec's `load` (`fastrms.kernels.storage`): the
native one reads the float array as it is; `BFLOAT16` / `FLOAT16` read 16-bit grads (bit
patterns in uint16) as the float32 values they stand for, exactly, so a 16-bit grad's norm
is the norm of those values. `fastrms.reference.global_norm` computes the same sum in NumPy,
bit for bit.
"""

import numpy as np
from numba import njit, prange

from ._jit import jit, name
from .storage import NATIVE, grad_suffix

#: Elements per block of the sum of squares (and per chunk of a chunk table).
BLOCK = 1 << 15
#: Lanes of a block's float64 partial sums.
LANES = 1024

_NONFINITE: dict = {}
_BLOCKS: dict = {}
_SUMSQ: dict = {}


def nonfinite(parallel, grads=NATIVE):
    """`(a) -> bool`: whether the 1-D array `a`, read as `grads` says, holds a NaN or an
    infinity."""
    fn = _NONFINITE.get((parallel, grads.tag))
    if fn is None:
        fn = _NONFINITE[(parallel, grads.tag)] = _make_nonfinite(parallel, grads)
    return fn


@njit(inline="always")
def _zero_native(a):
    return a.dtype.type(0.0)


@njit(inline="always")
def _zero_float32(a):
    return np.float32(0.0)


def _make_nonfinite(parallel, grads):
    """`x - x` is 0 exactly when `x` is finite (no fastmath, so LLVM may not fold it),
    counted with an integer sum that vectorises. The array is only read."""
    load, zero_of = grads.load, (_zero_native if grads is NATIVE else _zero_float32)

    def nonfinite(a):
        zero = zero_of(a)  # in the type `load` returns
        count = 0
        for i in prange(a.size):
            x = load(a, i)
            count += 1 if x - x != zero else 0
        return count > 0

    name(nonfinite, f"nonfinite{grad_suffix(grads)}_{'parallel' if parallel else 'serial'}")
    return jit(parallel)(nonfinite)


#: `nonfinite_serial(a)` / `nonfinite_parallel(a)`: True if the 1-D float array `a`
#: holds a NaN or +-Inf.
nonfinite_serial, nonfinite_parallel = nonfinite(False), nonfinite(True)


def block_sumsq_of(grads):
    """`block_sumsq` reading its array as `grads` says (inline)."""
    fn = _BLOCKS.get(grads.tag)
    if fn is None:
        fn = _BLOCKS[grads.tag] = _make_block_sumsq(grads)
    return fn


def _make_block_sumsq(grads):
    load = grads.load

    def block_sumsq(a):
        """The float64 sum of squares of `a` (at most `BLOCK` elements), in the module's
        fixed order. NaN or infinity in `a` gives NaN or infinity."""
        lanes = np.zeros(LANES)
        rows = a.size // LANES
        for r in range(rows):
            base = r * LANES
            for j in range(LANES):
                x = np.float64(load(a, base + j))
                lanes[j] += x * x
        base = rows * LANES
        for j in range(a.size - base):
            x = np.float64(load(a, base + j))
            lanes[j] += x * x
        w = LANES
        while w > 1:
            w //= 2
            for j in range(w):
                lanes[j] += lanes[j + w]
        return lanes[0]

    name(block_sumsq, f"block_sumsq{grad_suffix(grads)}")
    return njit(inline="always")(block_sumsq)


#: The float64 sum of squares of a float array of at most `BLOCK` elements (inline).
block_sumsq = block_sumsq_of(NATIVE)


def sumsq(parallel, grads=NATIVE):
    """`(a) -> float`: the float64 sum of squares of the 1-D array `a` read as `grads` says,
    block by block (read-only)."""
    fn = _SUMSQ.get((parallel, grads.tag))
    if fn is None:
        fn = _SUMSQ[(parallel, grads.tag)] = _make_sumsq(parallel, grads)
    return fn


def _make_sumsq(parallel, grads):
    block = block_sumsq_of(grads)

    def sumsq(a):
        n = a.size
        blocks = (n + BLOCK - 1) // BLOCK
        partial = np.empty(blocks)
        for b in prange(blocks):
            partial[b] = block(a[b * BLOCK : min(n, (b + 1) * BLOCK)])
        total = 0.0
        for b in range(blocks):
            total += partial[b]
        return total

    name(sumsq, f"sumsq{grad_suffix(grads)}_{'parallel' if parallel else 'serial'}")
    return jit(parallel)(sumsq)


#: `sumsq_serial(a)` / `sumsq_parallel(a)`: the float64 sum of squares of the 1-D float
#: array `a`, the same bits from both.
sumsq_serial, sumsq_parallel = sumsq(False), sumsq(True)
