"""The loop shells over named rows of a 2-D table (sparse updates of embedding tables), and
the merging of duplicate row indices.

Both shells step each named row by the element function over its elements (the same
arithmetic, the same bits, as a dense step over them) and leave every other row untouched,
in one loop over rows (`_make_row_run`); each prefetches the table rows
`AHEAD` iterations on (random rows of a big table are bound by memory latency, which
the hardware prefetchers cannot hide: `.prefetch`). `param` and the state are the
flat (C-order) views of `(n, width)` tables, `last`, `t`, `catch_up`, `decay` and
`drift_lr` drive the catch-up below:

- `rows(key, parallel)`: `(scalars, param, grad_rows, square_avg, grad_avg, momentum_buffer,
  rows, width, last, t, catch_up, update, decay, drift_lr)` (`scalars`: the nine `Scalars`
  floats, one tuple, first as in every shell) with `rows` distinct indices in `[0, n)` and `grad_rows` the flat
  `(len(rows), width)` grads; rows are spread over the threads. With `update` False only
  the catch-up below runs (before a dense step over the whole table, which then steps every
  row itself).
- `merged_rows(key, parallel)`: `(scalars, param, grad_rows, square_avg, grad_avg,
  momentum_buffer, rows, n, width, parts, last, t, catch_up, decay, drift_lr)`,
  with `rows` as the user gave them: duplicates allowed, any values. It returns the
  position of the first row outside `[0, n)` (then nothing is written), else -1. The rows
  are split into `parts` by a hash of the index (one part per thread: `parts` is the
  number of threads, or 1 serial), so each distinct row belongs to one part; each part
  groups its positions through an open-addressing hash (no array the size of the table, no
  sort), adds the grads of each row named more than once, from zero in the order given, and
  steps its rows: one parallel region, and the same bits whatever `parts` is.
- `coalesce(rows, n, grad_rows, width) -> (unique, grads, bad)`: the same grouping in one
  thread, for the options that need the summed grads before any row is stepped (the global
  norm, the non-finite check).

With `rowwise` (`rows(key, parallel, True)`, its rows distinct, as `coalesce` leaves them),
`square_avg` holds one value a row (`square_avg[r]`, the row's index), averaged over the
row's grads before its elements are updated (`_make_row_run`);
`fastrms.RMSprop(state_layout="rowwise")`'s dense step is this shell over every row of each
param.

With `catch_up` (the dense-equivalent mode), `last[r]` is the step that last touched row
`r`; a row last touched `k >= 1` steps before `t - 1` first gets the closed form of the
`k` zero-gradient steps it missed (with g = 0, u = 0 exactly):

    v <- beta^k v;   m <- beta^k m                          (centered; rowwise: the row's v)
    b <- mu^k b;     p <- a^k p - c b                       a = 1 - lr * wd (decoupled), else 1
    c = drift_lr * mu * (a^k - mu^k) / (a - mu)   (k mu^k when a == mu), times mu with Nesterov
                                                  drift_lr = lr (lr outside the buffer), else 1

and `last[r] = t`. The caller guarantees a constant learning rate where `c` or `a`
holds it, and refuses coupled weight decay (g = wd * p is not zero: no closed form).
"""

import numpy as np
from numba import njit, prange

from ._jit import jit, name
from .element import MOM_NONE, apply, constants, element, grad_of
from .prefetch import prefetch_rows, prefetch_write

#: How many rows ahead the row shells prefetch (4 to 16 measured alike on 2 cores, 64-wide
#: float32 rows of a 256 MB table: `fastrms bench --sparse`).
AHEAD = 8

#: The multiplicative (Fibonacci) hash placing a row in a thread's table, and an unrelated
#: odd multiplier choosing the thread (the table's top bits would leave half of it empty).
_PLACE, _SPLIT = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xD6E8FEB86659FD93)

_ROWS: dict = {}


@njit(inline="always")
def first_bad(rows, n):
    """The position of the first of `rows` outside `[0, n)`, else -1."""
    for i in range(rows.size):
        if rows[i] < 0 or rows[i] >= n:
            return i
    return -1


@njit(inline="always")
def _falls_to(r, part, parts):
    """Whether row `r` falls to thread `part` of `parts` (1 or 0)."""
    return (((np.uint64(r) * _SPLIT) >> np.uint64(32)) * np.uint64(parts)) >> np.uint64(32) == np.uint64(part)


@njit(inline="always")
def group(rows, part, parts):
    """Thread `part` of `parts`'s share of `rows` (the rows whose hash falls to it):
    `(unique, first, count, where, mine, u, c)`: its `u` distinct rows in order of first
    appearance, each one's first position and count; its `c` positions in order
    (`mine`) and the index of each one's row in `unique` (`where`)."""
    if parts == 1:  # every position is this thread's: no hash to take
        c = rows.size
        mine = np.arange(c)
    else:
        c = 0
        for i in range(rows.size):  # counted first: each thread's scratch is the size of its share
            c += _falls_to(rows[i], part, parts)
        mine = np.empty(c + 1, np.int64)
        m = 0
        for i in range(rows.size):  # no branch: the split is a coin toss per row
            mine[m] = i
            m += _falls_to(rows[i], part, parts)
    cap, bits = 16, 4
    while cap < 2 * c:
        cap, bits = 2 * cap, bits + 1
    table = np.full(cap, -1, np.int64)
    unique, first = np.empty(c, np.int64), np.empty(c, np.int64)
    count, where = np.zeros(c, np.int64), np.empty(c, np.int64)
    u = 0
    for q in range(c):
        i = mine[q]
        r = np.int64(rows[i])
        h = np.int64((np.uint64(r) * _PLACE) >> np.uint64(64 - bits))
        while table[h] != -1 and unique[table[h]] != r:
            h = (h + 1) & (cap - 1)
        s = table[h]
        if s == -1:
            s = table[h] = u
            unique[u], first[u] = r, i
            u += 1
        count[s] += 1
        where[q] = s
    return unique, first, count, where, mine, u, c


@njit(inline="always")
def add_duplicates(grad_rows, width, count, where, mine, u, c):
    """`(slot, summed)` for a `group` result: `summed[slot[s]]` is the sum of the
    grads of row `s` if it was named more than once (from zero, in the order given), and
    `slot[s] = -1` for a row named once (its grad is used as given). Overwrites `where`
    and `mine`."""
    slot = np.empty(u, np.int64)
    d = 0
    for s in range(u):
        slot[s] = d if count[s] > 1 else -1
        d += count[s] > 1
    summed = np.zeros(d * width, grad_rows.dtype)
    m = 0
    for q in range(c):  # the positions to add, compacted first: the adding loop has no branch
        s = slot[where[q]]
        if s >= 0:
            where[m], mine[m] = s * width, mine[q] * width
            m += 1
    w = np.uint64(width)
    for q in range(m):  # unsigned indices, no slices: as in the row loop (`_make_row_run`)
        out, g = np.uint64(where[q]), np.uint64(mine[q])
        for j in range(w):
            summed[out + j] += grad_rows[g + j]
    return slot, summed


@njit(inline="always")
def grads_of(s, slot, first, summed, grad_rows, width):
    """The grad row of unique row `s`: its sum if it was named more than once, else its
    grad as given (`add_duplicates`)."""
    a = (slot[s] if slot[s] >= 0 else first[s]) * width
    return summed[a : a + width] if slot[s] >= 0 else grad_rows[a : a + width]


@njit(inline="always")
def check_state(param, square_avg, grad_avg, momentum_buffer, uses_m, uses_b, rows_held):
    """A clear error, not a stray write, when the state is not the size of `param`
    (`square_avg`: `rows_held`, its row count, with rowwise state)."""
    if (
        square_avg.size != (rows_held if rows_held >= 0 else param.size)
        or (uses_m and grad_avg.size != param.size)
        or (uses_b and momentum_buffer.size != param.size)
    ):
        raise ValueError("rows: the state this variant keeps must have the size of param (rowwise: a value a row)")


def _make_coalesce():
    def coalesce(rows, n, grad_rows, width):
        """`(unique rows, grads, bad)`: duplicates of `rows` merged (`group`,
        `add_duplicates`), one grad row per unique row; `bad` is the position of the
        first row outside `[0, n)`, else -1 (then nothing else is returned)."""
        bad = first_bad(rows, n)
        if bad >= 0:
            return rows[:0].astype(np.int64), grad_rows[:0], bad
        unique, first, count, where, mine, u, c = group(rows, 0, 1)
        if u == c:
            return unique, grad_rows, -1
        slot, summed = add_duplicates(grad_rows, width, count, where, mine, u, c)
        grads = np.empty(u * width, grad_rows.dtype)
        for s in range(u):
            grads[s * width : (s + 1) * width] = grads_of(s, slot, first, summed, grad_rows, width)
        return unique[:u], grads, -1

    name(coalesce, "coalesce_rows")
    return jit()(coalesce)


#: `coalesce(rows, n, grad_rows_flat, width) -> (unique_rows, grads_flat, bad)`.
coalesce = _make_coalesce()


def rows(key, parallel, rowwise=False):
    """The shell over distinct rows of variant `key`, serial or `parallel=True`; with
    `rowwise`, `square_avg` holds one value a row."""
    return _shell("rows", key, parallel, rowwise)


def merged_rows(key, parallel, rowwise=False):
    """The shell over rows as given (duplicates merged, bounds checked) of variant `key`,
    serial or `parallel=True`. Not for rowwise state (`rowwise=True` is refused): its rows
    are coalesced first (`coalesce`), then stepped by `rows(key, parallel, True)`."""
    if rowwise:
        raise ValueError("merged_rows keeps the state element by element; rowwise rows: coalesce, then rows()")
    return _shell("merged_rows", key, parallel, False)


def _shell(kind, key, parallel, rowwise):
    fn = _ROWS.get((kind, key, parallel, rowwise))
    if fn is None:
        make = _make_rows if kind == "rows" else _make_merged_rows
        fn = _ROWS[(kind, key, parallel, rowwise)] = make(key, parallel, rowwise)
    return fn


@njit(inline="always")
def lane_sum(row, w, zero):
    """The sum of squares of `row[:w]` in 8 lanes, lane j % 8 adding element j in order,
    then ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)): a fixed order (the same bits
    anywhere; `fastrms.reference` writes it) that vectorises, as one sum cannot. `zero`:
    0 in the row's dtype."""
    l0 = l1 = l2 = l3 = l4 = l5 = l6 = l7 = zero
    whole = w >> np.uint64(3)
    for c in range(whole):
        q = np.uint64(c) << np.uint64(3)
        l0 += row[q] * row[q]
        l1 += row[q + np.uint64(1)] * row[q + np.uint64(1)]
        l2 += row[q + np.uint64(2)] * row[q + np.uint64(2)]
        l3 += row[q + np.uint64(3)] * row[q + np.uint64(3)]
        l4 += row[q + np.uint64(4)] * row[q + np.uint64(4)]
        l5 += row[q + np.uint64(5)] * row[q + np.uint64(5)]
        l6 += row[q + np.uint64(6)] * row[q + np.uint64(6)]
        l7 += row[q + np.uint64(7)] * row[q + np.uint64(7)]
    done = whole << np.uint64(3)
    for j in range(w - done):  # the tail: element done + j falls to lane j
        x = row[done + np.uint64(j)] * row[done + np.uint64(j)]
        if j == 0:
            l0 += x
        elif j == 1:
            l1 += x
        elif j == 2:
            l2 += x
        elif j == 3:
            l3 += x
        elif j == 4:
            l4 += x
        elif j == 5:
            l5 += x
        else:
            l6 += x
    return ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))


def _make_catch_up(key, rowwise):
    """`catch_up_row(param, square_avg, grad_avg, momentum_buffer, r, a0, w, skipped, decay,
    drift_lr, beta, mu)`: row `r` (elements `a0..a0 + w`) brought through the `skipped`
    zero-gradient steps it missed, in closed form (`fastrms.core.rows` derives it): the
    averages decay by `beta**skipped`, the param by `decay**skipped` and, with momentum, by
    the buffer's drift. Inlined into the row loop; called only for a row that missed steps."""
    uses_m = key.uses_grad_avg
    momentum, nesterov = key.mom_mode != MOM_NONE, key.nesterov

    def catch_up_row(param, square_avg, grad_avg, momentum_buffer, r, a0, w, skipped, decay, drift_lr, beta, mu):
        T = param.dtype.type
        bk = T(beta**skipped)
        if rowwise:
            square_avg[r] = bk * square_avg[r]
        else:
            for j in range(w):
                square_avg[a0 + j] = bk * square_avg[a0 + j]
        if uses_m:
            for j in range(w):
                grad_avg[a0 + j] = bk * grad_avg[a0 + j]
        ak = decay**skipped
        if momentum:
            muk = mu**skipped
            c = skipped * muk if decay == mu else mu * (ak - muk) / (decay - mu)
            c = T(drift_lr * c * (mu if nesterov else 1.0))
            akt, mukt = T(ak), T(muk)
            for j in range(w):
                b = momentum_buffer[a0 + j]
                param[a0 + j] = akt * param[a0 + j] - c * b
                momentum_buffer[a0 + j] = mukt * b
        elif decay != 1.0:
            akt = T(ak)
            for j in range(w):
                param[a0 + j] = akt * param[a0 + j]

    name(catch_up_row, f"catch_up_row_{key.tag}{'_rowwise' if rowwise else ''}")
    return njit(inline="always")(catch_up_row)


def _make_row_run(key, rowwise=False):
    """The `inline="always"` loop over rows `lo..hi` both shells run: each row's catch-up,
    then its update from its grads (`grad_rows[s]` if `slot` is empty, else
    `grads_of` `s`), with the row `AHEAD` on prefetched.

    Written for Numba's reference counting: one call per run of rows, not per row (each
    array an inlined function takes is a new reference), and whole arrays indexed with
    unsigned indices, not sliced per row (Numba could not drop the refcounts of slices in a
    loop this branchy; a signed index is wrapped if negative, which stops LLVM vectorising).
    Both cost the serial shell 2-3x its time (`fastrms bench --sparse`).

    With `rowwise` (the `rows` shell only: the grads are coalesced first, one grad row per
    row), `square_avg[r]` is row `r`'s one value: the row's grads (`grad_of`) are squared
    and summed in 8 lanes, `v = beta * v + (1 - beta) * (sum / width)` is stored, and each
    element is updated from that `v` (`element(key, rowwise=True)`)."""
    at = apply(key)
    update_rw, effective = element(key, True), grad_of(key)
    uses_m, uses_b = key.uses_grad_avg, key.uses_momentum_buffer
    catch_up_row = _make_catch_up(key, rowwise)

    def run(param, grad_rows, summed, slot, first, square_avg, grad_avg, momentum_buffer, rows, lo, hi, width, last,
            t, catch_up, update, decay, drift_lr, beta, mu, kc):  # fmt: skip
        T = param.dtype.type
        w = np.uint64(width)
        row = np.empty(width if rowwise else 0, T)  # rowwise: one row's grads, as the update reads them
        for s in range(lo, hi):
            if s + AHEAD < hi:  # the row a few iterations on: its misses overlap this row's work
                ahead = rows[s + AHEAD] * width
                prefetch_rows(param, ahead, width)
                if rowwise:
                    prefetch_write(square_avg, rows[s + AHEAD])
                else:
                    prefetch_rows(square_avg, ahead, width)
                if uses_m:
                    prefetch_rows(grad_avg, ahead, width)
                if uses_b:
                    prefetch_rows(momentum_buffer, ahead, width)
                if catch_up:
                    prefetch_write(last, rows[s + AHEAD])
            r = rows[s]
            a0 = np.uint64(r) * w
            if catch_up:
                skipped = t - 1 - last[r]
                if skipped > 0:
                    catch_up_row(param, square_avg, grad_avg, momentum_buffer, r, a0, w, skipped, decay, drift_lr, beta,
                                 mu)  # fmt: skip
                last[r] = t
            if update and rowwise:  # the row's v first, then each element from it (grads coalesced first)
                g0 = np.uint64(s) * w
                for j in range(w):  # the grads as the update reads them, first: this loop vectorises
                    row[j] = effective(param[a0 + j], grad_rows[g0 + j], kc)
                total = lane_sum(row, w, kc[11])
                v = kc[1] * square_avg[r] + kc[2] * (total / T(width)) if width > 0 else square_avg[r]
                square_avg[r] = v  # (a row of no elements keeps its v)
                for j in range(w):
                    m = grad_avg[a0 + j] if uses_m else kc[11]
                    b = momentum_buffer[a0 + j] if uses_b else kc[11]
                    p, _, m, b = update_rw(param[a0 + j], grad_rows[g0 + j], v, m, b, kc)
                    param[a0 + j] = p
                    if uses_m:
                        grad_avg[a0 + j] = m
                    if uses_b:
                        momentum_buffer[a0 + j] = b
            elif update:  # the element function every shell calls: the same bits
                if slot.size and slot[s] >= 0:  # a row named more than once: its sum
                    g0 = np.uint64(slot[s]) * w
                    for j in range(w):
                        p, v, m, b = at(
                            a0 + j, param[a0 + j], summed[g0 + j], square_avg, grad_avg, momentum_buffer, kc
                        )
                        param[a0 + j] = p
                        square_avg[a0 + j] = v
                        if uses_m:
                            grad_avg[a0 + j] = m
                        if uses_b:
                            momentum_buffer[a0 + j] = b
                else:
                    g0 = np.uint64(first[s] if slot.size else s) * w
                    for j in range(w):
                        p, v, m, b = at(
                            a0 + j, param[a0 + j], grad_rows[g0 + j], square_avg, grad_avg, momentum_buffer, kc
                        )
                        param[a0 + j] = p
                        square_avg[a0 + j] = v
                        if uses_m:
                            grad_avg[a0 + j] = m
                        if uses_b:
                            momentum_buffer[a0 + j] = b

    name(run, f"run_rows_{key.tag}")
    return njit(inline="always")(run)


#: Rows a thread of the `rows` shell takes at a time (one `_make_row_run` call).
BLOCK = 256


def _make_rows(key, parallel, rowwise):
    run = _make_row_run(key, rowwise)
    uses_m, uses_b = key.uses_grad_avg, key.uses_momentum_buffer

    def shell(scalars, param, grad_rows, square_avg, grad_avg, momentum_buffer, rows, width, last, t, catch_up, update,
              decay, drift_lr):  # fmt: skip
        if update and grad_rows.size != rows.size * width:
            raise ValueError("rows: grad_rows must hold width elements per row")
        n = param.size // width if width else last.size  # whole arrays are indexed: no slice clamps
        check_state(param, square_avg, grad_avg, momentum_buffer, uses_m, uses_b, n if rowwise else -1)
        if (width or catch_up) and (first_bad(rows, n) >= 0 or (catch_up and last.size != n)):
            raise ValueError("rows: every row must be in [0, n) and last the size of n (catch_up)")
        kc, beta, mu = constants(param.dtype.type, scalars), scalars[1], scalars[5]
        none = rows[:0]
        for block in prange((rows.size + BLOCK - 1) // BLOCK):
            lo, hi = block * BLOCK, min((block + 1) * BLOCK, rows.size)
            run(param, grad_rows, grad_rows, none, none, square_avg, grad_avg, momentum_buffer, rows, lo, hi, width,
                last, t, catch_up, update, decay, drift_lr, beta, mu, kc)  # fmt: skip
        return parallel

    name(shell, f"rows_{key.tag}{'_rowwise' if rowwise else ''}_{'parallel' if parallel else 'serial'}")
    return jit(parallel)(shell)


def _make_merged_rows(key, parallel, rowwise):
    run = _make_row_run(key, rowwise)
    uses_m, uses_b = key.uses_grad_avg, key.uses_momentum_buffer

    def shell(scalars, param, grad_rows, square_avg, grad_avg, momentum_buffer, rows, n, width, parts, last, t,
              catch_up, decay, drift_lr):  # fmt: skip
        if grad_rows.size != rows.size * width or param.size != n * width or (catch_up and last.size != n):
            raise ValueError("merged_rows: grad_rows must hold width elements per row, param n rows, last n (catch_up)")
        check_state(param, square_avg, grad_avg, momentum_buffer, uses_m, uses_b, n if rowwise else -1)
        bad = first_bad(rows, n)
        if bad >= 0:
            return bad
        kc, beta, mu = constants(param.dtype.type, scalars), scalars[1], scalars[5]
        for part in prange(parts):
            unique, first, count, where, mine, u, c = group(rows, part, parts)
            slot, summed = add_duplicates(grad_rows, width, count, where, mine, u, c)
            run(param, grad_rows, summed, slot, first, square_avg, grad_avg, momentum_buffer, unique, 0, u, width,
                last, t, catch_up, True, decay, drift_lr, beta, mu, kc)  # fmt: skip
        return -1

    name(shell, f"merged_rows_{key.tag}{'_rowwise' if rowwise else ''}_{'parallel' if parallel else 'serial'}")
    return jit(parallel)(shell)
