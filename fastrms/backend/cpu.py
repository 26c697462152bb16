"""The CPU backend of `fastrms.RMSprop`: where and how each step's kernels run.

`Plan(slots, hyper, spec)` groups the params by dtype (`fastrms.backend.layout.Group`: one
kernel call a group, with its pointer table) and picks each group's kernels for this
process: serial below `fastrms.kernels.PARALLEL_MIN_BYTES`, else parallel, or parallel
behind the process-wide lock under `workqueue` (`kernel`, `fastrms.core.runtime.locked`), picked
again whenever `fastrms.core.runtime.generation` changes (after a fork). A step is then

    calls = plan.calls(groups, checked, clipping, low)  # which shell steps each group, with what
    verdict = plan.verdict(calls, grads, options)       # the guard over those calls' reductions
    plan.run(calls, scalars)                            # one kernel call per group

A group of float32 params whose grads all arrive as bfloat16 or float16 (`low`: their
indices) is stepped by the kernels that read such grads (`fastrms.kernels.storage.ARRAYS`),
chosen by the grads' dtype at each step. The optimizer validates; the plan only runs what
it is given. A backend for another device is another module with this interface.
"""

from typing import Any, NamedTuple

import numba
import numpy as np

from .. import kernels
from ..core import guard, runtime
from ..kernels import storage
from .layout import Group, all_rows, grad_span

__all__ = ["Call", "Plan", "all_rows", "chunks", "kernel", "parallel", "rowwise"]


class Call(NamedTuple):
    """One group's kernel call in a step (`Plan.calls`): which shell steps it (`"dense"`,
    `"segments"` or `"rowwise"`), with what arrays, the arrays its non-finite check and its
    sum of squares read (None: no norm is summed), and the codec its grads are read with."""

    shell: str
    args: tuple
    check: Any
    norm: Any
    grads: Any


#: The step shells by the arrays' shape: one flat array (`dense`), many through a chunk table
#: (`segments`), a flat array written out of place (`out`), rows (`rows`), each a
#: `fastrms.kernels` factory `(variant, parallel, *formats)`; `stochastic` ones round
#: bfloat16 params stochastically.
_SHELLS = {
    ("dense", False): kernels.dense,
    ("segments", False): kernels.segments,
    ("out", False): kernels.dense_out,
    ("rows", False): kernels.rows,
    ("dense", True): kernels.stochastic,
    ("segments", True): kernels.stochastic_segments,
}


def parallel(size, itemsize, streams):
    """Whether a step of `size` elements of `itemsize` bytes with `streams` state arrays runs
    on the parallel kernels here: the traffic rule (`fastrms.kernels.PARALLEL_MIN_BYTES`)
    and what this process may run (`fastrms.core.runtime.parallel_for`). The one place the
    rule is applied for every front end."""
    return runtime.parallel_for(size, itemsize, streams)


_CHUNKS: dict = {}


def chunks(sizes):
    """The chunk table (`fastrms.kernels.chunk_table`) over arrays of `sizes` (a tuple of
    ints), made once and kept for the next step that steps arrays of the same sizes (up to
    256 tables)."""
    found = _CHUNKS.get(sizes)
    if found is None:
        if len(_CHUNKS) > 256:
            _CHUNKS.clear()
        found = _CHUNKS[sizes] = kernels.chunk_table(np.array(sizes, dtype=np.int64))
    return found


def kernel(shape, variant, parallel, *formats, stochastic=False):
    """The step kernel every front end calls for arrays laid out as `shape` (`_SHELLS`):
    variant `variant`, serial or parallel, the array formats `formats` in the factory's order
    (the state's codec, the copy's codec or None, the grads' codec: `fastrms.kernels.storage`;
    for `rows`, whether the state is rowwise), behind the process-wide lock when parallel
    kernels may not overlap here (`fastrms.core.runtime.locked`). The one place a kernel is
    chosen; factories cache what they compile, so a call costs a dict lookup or two."""
    make = _SHELLS[(shape, stochastic)]
    return runtime.locked(make(variant, bool(parallel), *formats), parallel)


class Plan:
    """The groups of an optimizer's params and the kernels each runs on here."""

    __slots__ = (
        "groups", "group_of", "packed", "chosen", "generation", "_variant", "_codec", "_rows", "_low", "_rowwise",
        "_update", "settled",
    )  # fmt: skip

    def __init__(self, slots, hyper, spec, copy=None):
        order = list(dict.fromkeys(s.dtype for s in slots))
        members = [[i for i, s in enumerate(slots) if s.dtype == dtype] for dtype in order]
        self.groups = [Group(m, [slots[i] for i in m], hyper, spec, copy) for m in members]
        self.group_of = [0] * len(slots)  # each array's group (one pass: a model may have 1e4 arrays)
        for g, m in enumerate(members):
            for i in m:
                self.group_of[i] = g
        # params that all tile one buffer (fastrms.pack) may be stepped with one flat grad
        only = self.groups[0] if len(self.groups) == 1 else None
        self.packed = only if only is not None and only.kind == "flat" else None
        self._codec = spec.codec  # the state's storage
        self._rowwise = spec.rowwise  # one square_avg value a row: the row shells step every group
        self.choose(spec.variant)

    def choose(self, variant):
        """Give each group its kernels for this process's parallel mode: `{"dense": (update,
        nonfinite, sumsq), "segments": (...)}` and whether they are the parallel ones. Starts
        the thread pool for big arrays: a threading layer that cannot start fails here."""
        self._variant = variant
        generation = runtime.generation()
        mode = runtime.parallel_mode() if any(g.big for g in self.groups) else "free"
        self.chosen = [self._kernels(group, group.big and mode != "serial", storage.NATIVE) for group in self.groups]
        self._low = {}  # the kernels of groups stepped with 16-bit grads, by (group, codec tag)
        self._rows = {}  # step_rows's kernels, by (kind, parallel): chosen again with the rest
        dense = self.chosen[0][0].get("dense") if self.groups else None  # none with rowwise state
        self._update = dense and dense[0]  # `update`: settled by `settle`
        self.settled = False
        self.generation = generation

    def _kernels(self, group, parallel, grads):
        """`(pairs, parallel)`: a group's kernels reading its grads as `grads` says."""
        if self._rowwise:
            reducers = (kernels.nonfinite_segments(parallel, grads), kernels.sumsq_segments(parallel, grads))
            locked = tuple(runtime.locked(f, parallel) for f in reducers)
            return {"rowwise": (rowwise(self._variant, parallel), *locked)}, parallel
        formats = (self._codec, group.copy, grads)
        reducers = {
            "dense": (kernels.nonfinite(parallel, grads), kernels.sumsq(parallel, grads)),
            "segments": (kernels.nonfinite_segments(parallel, grads), kernels.sumsq_segments(parallel, grads)),
        }
        return {
            shape: (kernel(shape, self._variant, parallel, *formats), *(runtime.locked(f, parallel) for f in fns))
            for shape, fns in reducers.items()
        }, parallel

    def _pairs(self, index, grads):
        """Group `index`'s kernels for grads read as `grads` (made on first use)."""
        if grads is storage.NATIVE:
            return self.chosen[index][0]
        found = self._low.get((index, grads.tag))
        if found is None:
            found = self._low[(index, grads.tag)] = self._kernels(self.groups[index], self.chosen[index][1], grads)
        return found[0]

    def current(self):
        """Choose again if the process's parallel mode may have changed (one global read)."""
        if self.generation != runtime.generation():
            self.choose(self._variant)

    def update(self):
        """The first group's in-place dense kernel (an optimizer over one array), called
        `(scalars, *arrays, *more)` (`more`: the copy, if any) until `settle`, then
        `(scalars, *arrays, more)`: the entry point of the machine code the first call ran,
        which skips Numba's type dispatch (0.4 us of a 1000-element step) and takes the
        shell's trailing arrays as the one tuple Numba folds them into. The caller passes what
        it checked: C-contiguous arrays of the dtypes of that first call."""
        return self._update

    def settle(self, scalars, arrays, more):
        """After a call of `update()` with `(scalars, *arrays, *more)`: keep the entry point of
        the machine code that call ran (a locked kernel, `fastrms.core.runtime.locked`, is
        called through it as it is)."""
        self.settled = True
        fn = self._update
        typed = tuple(numba.typeof(a) for a in (scalars, *arrays))
        rest = tuple(numba.typeof(a) for a in more)
        for sig, found in getattr(fn, "overloads", {}).items():
            if sig[:-1] == typed and tuple(sig[-1]) == rest:
                self._update = found.entry_point
                return
        self._update = lambda scalars, *args: fn(scalars, *args[:-1], *args[-1])

    def parallel_of(self, index):
        """Whether param `index`'s group runs on the parallel kernels."""
        return self.chosen[self.group_of[index]][1]

    def parallel_flags(self, count):
        """For each of the `count` params, whether its group runs on the parallel kernels now."""
        self.current()
        return [self.parallel_of(i) for i in range(count)]

    @staticmethod
    def calls(groups, checked, clipping, low=()):
        """A `Call` for each group: which shell steps it, with what. The norm (`clipping`)
        is always summed per array (a chunk table for several), so its bits do not depend on
        which shell steps the group. `low`: the indices of 16-bit grads (`check_grads`); a
        group's grads are all of its params' dtype or all of one 16-bit dtype (TypeError
        otherwise, before anything is written)."""
        out = []
        for group in groups:
            grads = _grads_codec(group, checked, low) if low else storage.NATIVE
            if group.kind == "rowwise":  # every row of every param: the row shell, one call a param
                if grads is not storage.NATIVE:
                    raise TypeError(
                        f"state_layout='rowwise' reads grads in the params' dtype ({group.dtype}); grads["
                        f"{group.indices[0]}] is {checked[group.indices[0]][0].dtype}"
                    )
                group.ptrs[:, 1] = [checked[i][1] for i in group.indices]  # the reductions' table
                table = (group.witness, group.ptrs, group.sizes, group.chunks)
                tables = [
                    (s.flat, checked[i][0].reshape(-1), s.square_avg, s.grad_avg, s.momentum_buffer, rows, width)
                    for i, s, (rows, width) in zip(group.indices, group.slots, group.row_tables)
                    if s.flat.size
                ]
                out.append(Call("rowwise", (tables,), table, table, grads))
                continue
            if group.kind == "dense":
                s = group.slots[0]
                g = checked[group.indices[0]][0].reshape(-1)
                if grads is not storage.NATIVE:
                    g = g.view(np.uint16)
                arrays = (s.flat, g, s.square_avg, s.grad_avg, s.momentum_buffer)
                out.append(Call("dense", arrays if group.copy is None else (*arrays, s.copy), (g,), (g,), grads))
                continue
            addresses = [checked[i][1] for i in group.indices]
            table = (group.witness, group.ptrs, group.sizes, group.chunks)
            span = group.span
            if span is not None and grads is storage.NATIVE and group.grads_tile(addresses):
                g = grad_span(checked[group.indices[0]][0], addresses[0], span.flat.size)
                if g is not None:
                    if clipping:
                        group.ptrs[:, 1] = addresses
                    arrays = (span.flat, g, span.square_avg, span.grad_avg, span.momentum_buffer)
                    out.append(Call("dense", arrays, (g,), table if clipping else None, grads))
                    continue
            group.ptrs[:, 1] = addresses
            out.append(Call("segments", table, table, table, grads))
        return out

    def packed_call(self, checked, clipping, low=()):
        """The one call of params that tile one buffer, stepped with one flat grad (of their
        dtype, or 16-bit: `low` is `[0]`)."""
        packed = self.packed
        span, g = packed.span, checked[0][0]
        grads = storage.NATIVE
        if low:
            grads, g = storage.ARRAYS[g.dtype.name], g.view(np.uint16)
        arrays = (span.flat, g, span.square_avg, span.grad_avg, span.momentum_buffer)
        table = None
        if clipping:  # the norm is summed per array: the chunk table, at the grad's own offsets
            offsets = packed.offsets // (packed.dtype.itemsize // g.itemsize)
            packed.ptrs[:, 1] = offsets + checked[0][1]
            table = (packed.witness, packed.ptrs, packed.sizes, packed.chunks)
        return [Call("dense", arrays, (g,), table, grads)]

    def verdict(self, calls, checked, options):
        """The guard (`fastrms.core.guard.guard`) over `calls`: the groups' sums of squares
        added in order (reproducible), their non-finite checks, the grads for the overflow
        path."""
        pairs = self._pairs

        def sumsq(i, call):  # the norm is summed per array: a chunk table for several (see `calls`)
            shape = call.shell if call.shell == "rowwise" else "dense" if len(call.norm) == 1 else "segments"
            return pairs(i, call.grads)[shape][2](*call.norm)

        return guard.guard(
            lambda: sum(sumsq(i, call) for i, call in enumerate(calls)),
            lambda: any(pairs(i, call.grads)[call.shell][1](*call.check) for i, call in enumerate(calls)),
            lambda: [g for g, _ in checked],
            options,
        )

    def run(self, calls, scalars):
        """One kernel call per group, each given the step's `scalars` first, as a plain tuple."""
        scalars = tuple(scalars)  # a NamedTuple is typed 2.4x slower
        for i, call in enumerate(calls):
            self._pairs(i, call.grads)[call.shell][0](scalars, *call.args)

    def row_kernel(self, make, parallel):
        """The row shell `make` (`kernels.rows` or `kernels.merged_rows`) of this plan's
        variant for `step_rows`, kept until `choose` runs again."""
        shell = self._rows.get((make, parallel))
        if shell is None:
            shell = runtime.locked(make(self._variant, bool(parallel), self._rowwise), parallel)
            self._rows[(make, parallel)] = shell
        return shell


_NO_LAST = np.zeros(0, np.int64)


def rowwise(variant, parallel):
    """`run(scalars, tables)`: the rowwise row shell of `variant` over every row of each
    table `(param, grad, square_avg, grad_avg, momentum_buffer, rows, width)`, in order
    (`state_layout="rowwise"`: one `square_avg` value a row; `rows, width`: `all_rows`)."""
    shell = kernel("rows", variant, parallel, True)

    def run(scalars, tables):
        for param, grad, square_avg, grad_avg, momentum_buffer, rows, width in tables:
            shell(scalars, param, grad, square_avg, grad_avg, momentum_buffer, rows, width, _NO_LAST, 0, False, True,
                  1.0, 1.0)  # fmt: skip

    return run


def _grads_codec(group, checked, low):
    """The codec a group's grads are read with: native when none of them is 16-bit, the
    16-bit dtype's when all are and share it; TypeError naming a grad otherwise."""
    first = checked[group.indices[0]][0].dtype
    codec = storage.ARRAYS.get(first.name) if first != group.dtype else storage.NATIVE
    for i in group.indices:
        if checked[i][0].dtype != first:
            raise TypeError(
                f"grads[{i}] is {checked[i][0].dtype}, grads[{group.indices[0]}] {first}: the grads of one "
                f"dtype's params are all {group.dtype} or all of one 16-bit dtype (bfloat16 or float16)"
            )
    return codec
