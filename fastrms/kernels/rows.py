"""The loop shell over named rows of a 2-D table (sparse updates of embedding tables), and the
coalescing of duplicate row indices.

``rows(key, parallel)`` is ``(param, grad_rows, square_avg, grad_avg, momentum_buffer, rows,
width, last, t, catch_up, update, decay, drift_lr, *scalars)``: ``param`` and the state are the flat
(C-order) views of ``(n, width)`` tables, ``grad_rows`` the flat ``(len(rows), width)`` grads,
``rows`` distinct row indices in ``[0, n)``. Each named row is stepped by the element
function over its slices (the same arithmetic, the same bits, as a dense step over those
elements); rows are spread over the threads, and each thread prefetches the rows
:data:`AHEAD` iterations on (random rows of a big table are bound by memory latency, which
the hardware prefetchers cannot hide: :mod:`.prefetch`). Every other row is untouched.

With ``catch_up`` (the dense-equivalent mode), ``last[r]`` is the step that last touched row
``r``; a row last touched ``k >= 1`` steps before ``t - 1`` first gets the closed form of the
``k`` zero-gradient steps it missed (with g = 0, u = 0 exactly)::

    v <- beta^k v;   m <- beta^k m                          (centered)
    b <- mu^k b;     p <- a^k p - c b                       a = 1 - lr * wd (decoupled), else 1
    c = drift_lr * mu * (a^k - mu^k) / (a - mu)   (k mu^k when a == mu), times mu with Nesterov
                                                  drift_lr = lr (lr outside the buffer), else 1

and ``last[r] = t``. With ``update`` False only that catch-up runs (before a dense step over
the whole table, which then steps every row itself). The caller guarantees a constant learning rate where ``c`` or ``a``
holds it, and refuses coupled weight decay (g = wd * p is not zero: no closed form).
"""

import numpy as np
from numba import prange

from ._jit import jit, name
from .element import MOM_NONE, apply, constants
from .prefetch import prefetch_rows, prefetch_write

#: How many rows ahead the row shell prefetches (4 to 16 measured alike on 2 cores, 64-wide
#: float32 rows of a 256 MB table: ``fastrms bench --sparse``).
AHEAD = 8

_ROWS = {}


def rows(key, parallel):
    """The row shell of variant ``key``, serial or ``parallel=True``."""
    fn = _ROWS.get((key, parallel))
    if fn is None:
        fn = _ROWS[(key, parallel)] = _make_rows(key, parallel)
    return fn


def _make_rows(key, parallel):
    at = apply(key)
    uses_m, uses_b = key.uses_grad_avg, key.uses_momentum_buffer
    momentum, nesterov = key.mom_mode != MOM_NONE, key.nesterov

    def shell(param, grad_rows, square_avg, grad_avg, momentum_buffer, rows, width, last, t, catch_up, update, decay,
              drift_lr, lr, beta, eps_in, eps_out, wd, mu, grad_scale, bc, clip):  # fmt: skip
        if (update and grad_rows.size != rows.size * width) or param.size != square_avg.size:
            raise ValueError("rows: grad_rows must hold width elements per row, state the size of param")
        T = param.dtype.type
        if (uses_m and grad_avg.size != param.size) or (uses_b and momentum_buffer.size != param.size):
            raise ValueError("rows: the state this variant keeps must have the size of param")
        kc = constants(T, lr, beta, eps_in, eps_out, wd, mu, grad_scale, bc, clip)
        for k in prange(rows.size):
            if k + AHEAD < rows.size:  # the row a few iterations on: its misses overlap this row's work
                ahead = rows[k + AHEAD]
                prefetch_rows(param, ahead * width, width)
                prefetch_rows(square_avg, ahead * width, width)
                if uses_m:
                    prefetch_rows(grad_avg, ahead * width, width)
                if uses_b:
                    prefetch_rows(momentum_buffer, ahead * width, width)
                if catch_up:
                    prefetch_write(last, ahead)
            r = rows[k]
            a0, a1 = r * width, (r + 1) * width
            if catch_up:
                skipped = t - 1 - last[r]
                if skipped > 0:
                    bk = T(beta**skipped)
                    for j in range(a0, a1):
                        square_avg[j] = bk * square_avg[j]
                    if uses_m:
                        for j in range(a0, a1):
                            grad_avg[j] = bk * grad_avg[j]
                    ak = decay**skipped
                    if momentum:
                        muk = mu**skipped
                        s = skipped * muk if decay == mu else mu * (ak - muk) / (decay - mu)
                        c = T(drift_lr * s * (mu if nesterov else 1.0))
                        akt, mukt = T(ak), T(muk)
                        for j in range(a0, a1):
                            b = momentum_buffer[j]
                            param[j] = akt * param[j] - c * b
                            momentum_buffer[j] = mukt * b
                    elif decay != 1.0:
                        akt = T(ak)
                        for j in range(a0, a1):
                            param[j] = akt * param[j]
                last[r] = t
            if not update:
                continue
            p, g, v = param[a0:a1], grad_rows[k * width : (k + 1) * width], square_avg[a0:a1]
            m = grad_avg[a0:a1] if uses_m else grad_avg
            b = momentum_buffer[a0:a1] if uses_b else momentum_buffer
            for j in range(width):  # the element function every shell calls: the same bits
                at(j, p, g, v, m, b, p, v, m, b, kc)
        return parallel

    name(shell, f"rows_{key.tag}_{'parallel' if parallel else 'serial'}")
    return jit(parallel)(shell)


def _make_coalesce(parallel):
    def coalesce(rows, n, grad_rows, width):
        """``(unique rows, summed grads, bad)``: duplicates of ``rows`` merged, each row's grads
        added in the order given (the same bits serial or parallel), through an open-addressing
        hash of the indices that chains each row's positions in order (no array the size of
        the table, no sort); ``bad`` is the position of the first row outside ``[0, n)``,
        else -1 (then nothing else is returned)."""
        k = rows.size
        cap = 16
        while cap < 2 * k:
            cap *= 2
        table = np.full(cap, -1, np.int64)
        unique = np.empty(k, np.int64)
        first = np.empty(k, np.int64)  # per unique row: its first position, and its last so far
        last = np.empty(k, np.int64)
        after = np.empty(k, np.int64)  # per position: the next position of the same row, or -1
        u = 0
        for i in range(k):
            r = np.int64(rows[i])
            if r < 0 or r >= n:
                return rows[:0], grad_rows[:0], i
            h = (r * np.int64(-7046029254386353131)) & (cap - 1)  # a multiplicative (Fibonacci) hash
            while table[h] != -1 and unique[table[h]] != r:
                h = (h + 1) & (cap - 1)
            after[i] = -1
            if table[h] == -1:
                table[h] = u
                unique[u] = r
                first[u] = i
                last[u] = i
                u += 1
            else:
                s = table[h]
                after[last[s]] = i
                last[s] = i
        if u == k:
            return unique, grad_rows, -1
        summed = np.zeros(u * width, grad_rows.dtype)
        for s in prange(u):
            out = summed[s * width : (s + 1) * width]
            m = first[s]
            while m != -1:
                g = grad_rows[m * width : (m + 1) * width]
                for j in range(width):
                    out[j] += g[j]
                m = after[m]
        return unique[:u], summed, -1

    name(coalesce, f"coalesce_rows_{'parallel' if parallel else 'serial'}")
    return jit(parallel)(coalesce)


#: ``coalesce_serial/parallel(rows, n, grad_rows_flat, width) -> (unique_rows, grads_flat, bad)``.
coalesce_serial, coalesce_parallel = _make_coalesce(False), _make_coalesce(True)
