"""The sparse-row step: one optimizer step over the named rows of one or more 2-D tables
(embedding tables), shared by `fastrms.RMSprop.step_rows` and `fastrms.torch.RMSprop`'s
sparse grads.

Each touched row `r` of a table gets the dense step's element update over its elements
(the same bits) with grad `G[r]`, the sum of the grad rows naming `r` (added from zero, in
the order given, as torch's `coalesce` sums them); every other row stays bitwise unchanged.
All tables of one call share one step: one learning rate, one bias-correction count, one
global norm (`clip_global_norm`: the 2-norm over every table's summed rows) and one
non-finite check (`skip_nonfinite`: a NaN or an infinity in any table skips the whole
step). Every check (indices, shapes, dtypes, memory) runs before anything is written.

Lazy (the default): an untouched row's state does not decay. Dense-equivalent
(`dense_rows`): `last[r]` is the step that last touched row `r`, and a row touched at step
`t` after `k` untouched steps first gets the closed form of those `k` zero-gradient steps
(`fastrms.kernels.rows`), so the run equals a dense one with zero grads elsewhere, up to
rounding.
"""

from typing import NamedTuple

import numpy as np
from numba import get_num_threads

from .. import kernels
from . import guard, memory
from .checks import float_array


class Table(NamedTuple):
    """One table's part of a row step: its flat param and state (empty arrays for the state
    a variant does not keep), `(n, width)`, the checked row indices (a private int64 copy),
    the flat grad rows, the `last` counters (empty when lazy), its label for errors, and
    whether it may run on the parallel shells."""

    param: np.ndarray
    square_avg: np.ndarray
    grad_avg: np.ndarray
    momentum_buffer: np.ndarray
    n: int
    width: int
    rows: np.ndarray
    grads: np.ndarray
    last: np.ndarray
    label: str
    parallel: bool  # whether the parallel shells may step it (by its group and the threading layer)


def named(param, rows, grad_rows, table):
    """The checked tables of one `step_rows` call: `param` an index (or None) with `rows` and
    `grad_rows` one table's, or a sequence of `k` distinct indices with sequences of `k`;
    `table(param, rows, grad_rows, suffix)` checks one (suffix `""` or `"[i]"`)."""
    if param is None or isinstance(param, (bool, int, np.integer)):
        return [table(param, rows, grad_rows, "")]
    if isinstance(param, (str, bytes)) or not hasattr(param, "__len__"):
        raise TypeError(f"param must be an index or a sequence of indices, got {type(param).__name__}")
    k = len(param)
    if not all(isinstance(x, (list, tuple)) and len(x) == k for x in (rows, grad_rows)) or not k:
        raise TypeError(
            f"with param a sequence of {k} tables, rows and grad_rows must be lists or tuples of {k} arrays"
            if k
            else "param must name at least one table"
        )
    tables = [table(p, r, g, f"[{i}]") for i, (p, r, g) in enumerate(zip(param, rows, grad_rows))]
    owners = [id(tb.param) for tb in tables]
    if len(set(owners)) != k:
        first = next(i for i, o in enumerate(owners) if owners.count(o) > 1)
        raise ValueError(f"param names params[{int(param[first])}] twice; pass its rows once, concatenated")
    return tables


def slot_table(slots, single, owned, parallel_of, param, given_rows, given_grads, suffix):
    """One table of `fastrms.RMSprop.step_rows`, checked: `param` an index into `slots`
    (None for an optimizer over one), `given_rows` and `given_grads` its rows and grad rows, none of
    it sharing memory with what the step writes (`owned`, a `fastrms.core.memory.Owned`);
    `parallel_of(i)` whether slot `i`'s group may run on the parallel shells."""
    if param is None:
        if len(slots) != 1:
            raise TypeError(f"step_rows needs param= (0 to {len(slots) - 1}) for an optimizer over several")
        param = 0
    if isinstance(param, bool) or not isinstance(param, (int, np.integer)) or not 0 <= param < len(slots):
        raise ValueError(f"param{suffix} must be an index in [0, {len(slots)}), got {param!r}")
    i = int(param)
    slot = slots[i]
    if len(slot.shape) != 2:
        raise ValueError(
            f"step_rows needs a 2-D param (a table of rows); {memory.param_name(single, i)} has shape {slot.shape}"
        )
    n, width = slot.shape
    index = indices(given_rows, f"rows{suffix}")
    grads = grad_rows(given_grads, index.size, width, slot.dtype, f"grad_rows{suffix}")
    if owned.overlaps(kernels.contiguous_address(grads), grads.nbytes):  # C-contiguous: float_array
        raise memory.overlap(None, f"grad_rows{suffix}")
    memory.writeable(slot, single, i)
    return Table(
        slot.flat, slot.square_avg, slot.grad_avg, slot.momentum_buffer, n, width, index, grads, slot.row_step,
        f"rows{suffix}", parallel_of(i),
    )  # fmt: skip


def catch_up_slots(slots, t, hyper, variant, scalars, rowwise=False):
    """`dense_rows`, before a dense step `t`: `catch_up` every 2-D slot's rows that missed
    steps (`scalars` the step's; `rowwise`: one `square_avg` value a row)."""
    for s in slots:
        if s.row_step.size:
            catch_up(s.flat, s.square_avg, s.grad_avg, s.momentum_buffer, s.shape[1], s.row_step, t, hyper, variant,
                     scalars, rowwise)  # fmt: skip


def catch_up(param, square_avg, grad_avg, momentum_buffer, width, last, t, hyper, variant, scalars, rowwise=False):
    """`dense_rows`, before a dense step `t` of one table (flat param and state, empty arrays
    for the state the variant does not keep; `last` its row counters): bring every row that
    missed steps up to date (the closed form of its zero-gradient steps, `scalars` the
    step's), so the dense step starts from the state a dense run would have."""
    lagging = np.flatnonzero(last < t - 1)
    if lagging.size:
        kernels.rows(variant, False, rowwise)(
            tuple(scalars), param, param[:0], square_avg, grad_avg, momentum_buffer, lagging, width, last, t, True,
            False, *catch_up_constants(hyper, variant, scalars.lr),
        )  # fmt: skip


def indices(rows, name="rows"):
    """`rows` as a private 1-D int64 copy (a sequence of ints is taken as NumPy would take
    it), so that the indices checked are the ones used even if the caller's buffer changes
    during the step. TypeError for anything but integers."""
    if isinstance(rows, (list, tuple, range)):
        given = rows
        rows = np.asarray(rows) if len(rows) else np.zeros(0, np.int64)
        if rows.dtype.kind not in "iu" or any(isinstance(r, (bool, np.bool_)) for r in given):
            raise TypeError(f"{name} must be integers, got a {type(given).__name__} of {rows.dtype}")
    if not isinstance(rows, np.ndarray) or rows.dtype.kind not in "iu" or rows.ndim != 1:
        kind = f"{rows.dtype} of shape {rows.shape}" if isinstance(rows, np.ndarray) else type(rows).__name__
        raise TypeError(f"{name} must be a 1-D numpy array of integers (int32 or int64), got {kind}")
    if rows.dtype == np.uint64 and rows.size and rows.max() > np.iinfo(np.int64).max:  # would wrap negative
        position = int(np.argmax(rows > np.iinfo(np.int64).max))
        raise ValueError(f"{name}[{position}] = {int(rows[position])} is outside any table (beyond 2**63 - 1)")
    return np.array(rows, dtype=np.int64)


def grad_rows(grads, count, width, dtype, name="grad_rows"):
    """`grads` checked to be `(count, width)` of `dtype`, C-contiguous; returned flat."""
    grads = float_array(name, grads, writeable=False)
    if grads.dtype != dtype or grads.shape != (count, width):
        raise ValueError(f"{name} must be {dtype} of shape ({count}, {width}), got {grads.dtype} {grads.shape}")
    return grads.reshape(-1)


def bad_row(table, position):
    """The ValueError for `table.rows[position]` outside `[0, n)`."""
    value, n = int(table.rows[position]), table.n
    why = " (negative indices are not accepted)" if value < 0 else f" (the table has {n} rows)"
    return ValueError(f"{table.label}[{position}] = {value} is outside [0, {n}){why}")


def check_bounds(table):
    """Raise `bad_row` for the first index outside `[0, n)` (NumPy, before any kernel runs)."""
    if table.rows.size:
        outside = (table.rows < 0) | (table.rows >= table.n)
        if outside.any():
            raise bad_row(table, int(np.argmax(outside)))


def catch_up_constants(hyper, variant, lr):
    """The row kernels' `(decay, drift_lr)` at learning rate `lr` (`fastrms.kernels.rows`)."""
    decay = 1.0 - lr * hyper["weight_decay"] if hyper["decoupled_weight_decay"] else 1.0
    return decay, lr if variant.mom_mode == kernels.MOM_OUTSIDE else 1.0


def step(tables, t, hyper, variant, kernel, take):
    """One step `t` over `tables` (checked `Table`s of one dtype and `variant`, options
    `hyper`: `dense_rows` and the guard's among them) by the front end's step protocol
    `take(verdict, run)` (`fastrms.core.clock.Clock.take`, or one that counts as torch does):
    `run(scalars)` writes the rows with the step's kernel scalars. `kernel(make, parallel)`
    returns the shell (`kernels.rows` or `kernels.merged_rows`) to call; a table runs on the
    parallel one when it may and its rows move `PARALLEL_MIN_BYTES`. Returns the global norm
    before clipping (None without `clip_global_norm`); raises before any write for a row
    outside its table."""

    def parallel(table):
        return table.parallel and (
            kernels.step_bytes(table.grads.size, table.grads.itemsize, 1 + _states(table)) >= kernels.PARALLEL_MIN_BYTES
        )

    dense_rows = hyper["dense_rows"]
    for table in tables:
        if len(tables) > 1 or not table.width:
            check_bounds(table)  # no table is written before every table's rows are known good
    # a table of width 0 holds no elements: nothing to write (a rowwise v of no elements is
    # kept, as the reference keeps it) but the rows' dense_rows counters
    idle = [tb for tb in tables if not tb.width and tb.last.size]
    tables = [tb for tb in tables if tb.width]
    if not guard.guarded(hyper) and hyper["state_layout"] != "rowwise":  # one call per table: merge, check, step

        def merged(scalars):
            catch_up = catch_up_constants(hyper, variant, scalars.lr)
            for table in tables:
                p = parallel(table)
                parts = get_num_threads() if p else 1  # one hash partition of the rows per thread
                bad = kernel(kernels.merged_rows, p)(
                    tuple(scalars), table.param, table.grads, table.square_avg, table.grad_avg,
                    table.momentum_buffer, table.rows, table.n, table.width, parts, table.last, t, dense_rows,
                    *catch_up,
                )  # fmt: skip
                if bad >= 0:
                    raise bad_row(table, bad)
            _touch(idle, t)

        take(guard.GO, merged)
        return None
    # the global norm and the non-finite check need every table's summed rows first (and the
    # rowwise row shell takes distinct rows, one grad row each)
    summed = []
    for table in tables:
        unique, g, bad = kernels.coalesce(table.rows, table.n, table.grads, table.width)
        if bad >= 0:
            raise bad_row(table, bad)
        summed.append((unique, g))
    verdict = guard.guard(
        lambda: sum(
            (kernels.sumsq_parallel if parallel(tb) else kernels.sumsq_serial)(g) for tb, (_, g) in zip(tables, summed)
        ),
        lambda: any(kernels.nonfinite_serial(g) for _, g in summed),
        lambda: [g for _, g in summed],
        hyper,
    )

    def coalesced(scalars):
        catch_up = catch_up_constants(hyper, variant, scalars.lr)
        for table, (unique, g) in zip(tables, summed):
            kernel(kernels.rows, parallel(table))(
                tuple(scalars), table.param, g, table.square_avg, table.grad_avg, table.momentum_buffer, unique,
                table.width, table.last, t, dense_rows, True, *catch_up,
            )  # fmt: skip
        _touch(idle, t)

    take(verdict, coalesced)
    return verdict.norm


def _touch(tables, t):
    """`dense_rows`: the rows of `tables` (of width 0) were stepped at `t`."""
    for table in tables:
        table.last[table.rows] = t


def _states(table):
    return sum(1 for a in (table.square_avg, table.grad_avg, table.momentum_buffer) if a.size)
