"""The fused RMSprop kernels: Numba code and nothing else (this package imports nothing from
the rest of fastrms, so user `@njit` code can call it directly).

- `.element`: the per-element update, written once, specialised per `Variant`;
- `.storage`: how the shells read and write the state, a codec chosen at compile time
  (`NATIVE`: the params' dtype; `BFLOAT16`: bfloat16 bits in uint16 for float32 params;
  `BLOCKWISE8`: blocks of 256 one-byte codes and a float32 scale), and a float32 step's
  other 16-bit arrays (`ARRAYS`: bfloat16 or float16 grads and
  copies);
- `.dense`: the one builder of the loop shells over whole flat arrays (`flat(key, parallel,
  Form(...))`, the array formats as parameters): in place and out of place, serial and
  parallel, with a low-precision copy, and stochastic (bfloat16 params kept without a
  master, rounded stochastically from a counter-based hash); `dense`, `dense_out` and
  `stochastic` name the common forms;
- `.blockwise`: the pass over 8-bit blockwise state (each block dequantised, stepped and
  requantised);
- `.segments`: the loop shell over a chunk table, built from the flat shell of the same
  form (`table`): many arrays of one dtype in one call;
- `.rows`: the loop shells over named rows of a table (sparse updates; rowwise state, one
  `square_avg` value a row), and coalescing;
- `.prefetch`: the software prefetch of the row shell (rows named by an index array);
- `.reduce`: read-only passes (the non-finite check behind `skip_nonfinite`, the
  reproducible sum of squares behind `clip_global_norm`), of float or 16-bit grads;
- `rmsprop_update`: the plain step, for user `@njit` code;
- `drivers`: the serial and parallel dense shells of a variant;
- `step_bytes` and `PARALLEL_MIN_BYTES`: the traffic rule behind the
  serial/parallel choice;
- `jit`, `cache_stats` and `SOURCE_HASH`: the decorator of every kernel and
  its on-disk cache (`._jit`: a cache that hits in every new process and is never stale).

Each shell reads `param`, `grad` and the state arrays once and writes `param` and the
state once, element by element: no temporaries and no second pass. Every shell takes the
step's scalars first, as one tuple of the nine `Scalars` floats (`shell(scalars, *arrays)`);
they are rounded once to the arrays' dtype, so float32 arrays are updated in float32
arithmetic throughout.

A shell's hot loop slices nothing and calls no inlined function taking arrays but the
element function and the prefetch hints: Numba counts a reference for each, and cannot
always drop the counts in a branchy loop (the row shells paid 12 calls a row, 2-3x their
one-thread time, until `.rows` indexed whole arrays). Such indices are unsigned where
LLVM must vectorise: a signed one is wrapped if negative, which it cannot vectorise.
"""

import numpy as np

from . import _jit, storage
from ._jit import SOURCE_HASH, cache_stats, jit
from .dense import Form, dense, dense_out, flat, stochastic
from .element import (
    MOM_INSIDE,
    MOM_NONE,
    MOM_OUTSIDE,
    WD_COUPLED,
    WD_DECOUPLED,
    WD_NONE,
    Scalars,
    Variant,
    element,
    variant,
    variants,
)
from .prefetch import prefetch_rows, prefetch_write
from .reduce import BLOCK, LANES, nonfinite, nonfinite_parallel, nonfinite_serial, sumsq, sumsq_parallel, sumsq_serial
from .rows import coalesce, merged_rows, rows
from .segments import (
    CHUNK,
    chunk_table,
    increment,
    nonfinite_segments,
    nonfinite_segments_parallel,
    nonfinite_segments_serial,
    segments,
    stochastic_segments,
    sumsq_segments,
    sumsq_segments_parallel,
    sumsq_segments_serial,
    table,
)

__all__ = [
    "BLOCK",
    "CHUNK",
    "LANES",
    "MOM_INSIDE",
    "MOM_NONE",
    "MOM_OUTSIDE",
    "PARALLEL_MIN_BYTES",
    "WD_COUPLED",
    "WD_DECOUPLED",
    "WD_NONE",
    "address",
    "contiguous_address",
    "SOURCE_HASH",
    "Scalars",
    "cache_stats",
    "Variant",
    "dense",
    "dense_out",
    "flat",
    "Form",
    "drivers",
    "element",
    "increment",
    "jit",
    "nonfinite",
    "nonfinite_parallel",
    "nonfinite_serial",
    "prefetch_rows",
    "prefetch_write",
    "rmsprop_update",
    "merged_rows",
    "rows",
    "storage",
    "chunk_table",
    "coalesce",
    "nonfinite_segments",
    "nonfinite_segments_parallel",
    "nonfinite_segments_serial",
    "segments",
    "step_bytes",
    "stochastic",
    "stochastic_segments",
    "sumsq",
    "sumsq_parallel",
    "sumsq_segments",
    "sumsq_segments_parallel",
    "sumsq_segments_serial",
    "sumsq_serial",
    "table",
    "variant",
    "variants",
]

PARALLEL_MIN_BYTES = 3 << 18
"""A step that moves at least this many bytes (768 KiB: param, grad and state read; param and
state written) runs on the parallel shell; a smaller one on the serial shell, since a parallel
launch costs several microseconds. Measured on 2 cores (`fastrms bench --threshold`): the
parallel shell starts to win between about 0.5 MiB (centered + momentum, float64) and 1.3 MiB
(plain, float32) of traffic."""


def __getattr__(attr):
    if attr == "CACHE_STATUS":  # "on", or why kernels are compiled in memory only
        return _jit.CACHE_STATUS
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


@jit()
def address(a):
    """The address of `a`'s first element (a Numba call: faster from Python than
    `a.__array_interface__`, which builds a dict)."""
    return a.ctypes.data


@jit()
def contiguous_address(a):
    """The address of `a`'s first element if `a` is C-contiguous, else -1: one call that
    answers both questions a step asks of each grad (alignment is `address % itemsize`)."""
    if a.flags.c_contiguous:
        return np.intp(a.ctypes.data)
    return np.intp(-1)  # (both branches intp: a bare -1 would unify with uintp to float64)


@jit()
def step_bytes(size, itemsize, state_arrays):
    """Bytes one fused step moves: reads 2 + k arrays, writes 1 + k (k state arrays)."""
    return size * itemsize * (3 + 2 * state_arrays)


def drivers(centered=False, wd_mode=WD_NONE, mom_mode=MOM_NONE, nesterov=False):
    """Return `(serial, parallel)`, the two in-place dense shells of one variant.

    Both take `(scalars, param, grad, square_avg, grad_avg, momentum_buffer)`, update in
    place and return whether they ran in parallel. The arrays are 1-D, of one float dtype and
    size; `grad_avg` and `momentum_buffer` may be empty (`param[:0]`) when the variant
    keeps no such state. `scalars` is one tuple of nine floats, `Scalars`' fields in order:

    | scalar | meaning | plain RMSprop |
    |---|---|---|
    | `lr` | the learning rate | e.g. 1e-3 |
    | `beta` | the decay of the averages (torch's `alpha`) | 0.9 |
    | `eps_in` | epsilon inside the root: `sqrt(v + eps_in)` | 0.0 |
    | `eps_out` | epsilon outside the root: `sqrt(v) + eps_out` | 1e-8 |
    | `weight_decay` | the decay's factor (coupled or decoupled, per `wd_mode`) | 0.0 |
    | `momentum` | the momentum factor (per `mom_mode`) | 0.0 |
    | `grad_scale` | every grad is multiplied by it first (-1 maximizes; a clip's coefficient) | 1.0 |
    | `bias_correction` | `1 - beta^t`, dividing `v` (1.0: none) | 1.0 |
    | `clip` | each grad element clamped to `[-clip, clip]` (`inf`: none) | inf |

    `kernels.Scalars(lr, beta, eps_in, eps_out, weight_decay, momentum, grad_scale,
    bias_correction)` builds them (`clip` defaults to infinity): `shell(tuple(Scalars(1e-3,
    0.9, 0.0, 1e-8, 0.0, 0.0, 1.0, 1.0)), p, g, v, p[:0], p[:0])` (a plain tuple: Numba
    types it as fast as separate floats, a NamedTuple 2.4x slower).
    """
    key = variant(centered, wd_mode, mom_mode, nesterov)
    return dense(key, False), dense(key, True)


_plain_serial, _plain_parallel = drivers()


@jit()
def rmsprop_update(param, grad, square_avg, learning_rate, beta, epsilon):
    """The plain RMSprop step, in place, callable from Python or from `@njit` code:

        v <- beta * v + (1 - beta) * g^2
        p <- p - learning_rate * g / (sqrt(v) + epsilon)

    `param`, `grad` and `square_avg` are C-contiguous float32 or float64 arrays of one
    dtype and size (any shape); float32 stays float32. Large arrays run in parallel. Returns
    nothing. Example:

        from numba import njit
        from fastrms.kernels import rmsprop_update

        @njit
        def train(w, v, g, steps):
            for _ in range(steps):
                g[:] = 2.0 * w - 1.0          # the gradient of sum((w - 0.5)**2)
                rmsprop_update(w, g, v, 0.01, 0.9, 1e-8)
    """
    n = param.size
    if grad.size != n or square_avg.size != n:
        raise ValueError("rmsprop_update: param, grad and square_avg must have one size")
    p = param.reshape(n)
    g = grad.reshape(n)
    v = square_avg.reshape(n)
    scalars = (float(learning_rate), float(beta), 0.0, float(epsilon), 0.0, 0.0, 1.0, 1.0, np.inf)
    if step_bytes(n, param.itemsize, 1) >= PARALLEL_MIN_BYTES:
        _plain_parallel(scalars, p, g, v, p[:0], p[:0])
    else:
        _plain_serial(scalars, p, g, v, p[:0], p[:0])
