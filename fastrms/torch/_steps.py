"""The step of `fastrms.torch.RMSprop` (a private module of `fastrms.torch`; it imports
torch): every param group checked and laid out first (`Steps.plan`: CPU, dtype, layout,
memory shared with another param or state, each param's state tensors made or found),
then one chunk-table kernel call per group, dtype and round (`Steps.run`; for bfloat16 or
float16 params the shell that steps their float32 masters from their 16-bit grads and
writes each param back in the same pass), the flat
buckets' dense calls (`fastrms.torch._buckets`), the sparse grads' row steps
(`fastrms.torch._sparse`), every `step` counter advanced in one call per dtype, and the
version counters bumped. A rejected step changes nothing."""

from typing import NamedTuple

import numpy as np
import torch

from .. import kernels
from ..backend import cpu
from ..core import options as O
from ..core import runtime, spec
from ..kernels import storage
from . import _fast, _guard, _options, _sparse, _tensors

_NUMPY = _tensors.NUMPY
_LOW = _tensors.LOW


class Call(NamedTuple):
    """One kernel call of a step: the pointer table (`kernels.segments`), the bytes each
    pointer covers, the sizes (int64) and chunk table, the grads read and the params they
    belong to (for the guard), the tensors whose version counters the step bumps, the
    addresses of the `step` counters it advances, by their NumPy dtype, and with rowwise
    state the row shell's tables (`fastrms.backend.cpu.rowwise`), else None."""

    ptrs: np.ndarray
    spans: np.ndarray
    sizes: np.ndarray
    chunks: np.ndarray
    total: int
    grads: list
    owners: list
    bumped: list
    steps: dict
    tables: "list | None"

    @classmethod
    def of(cls, rows, ptrs, sizes, chunks, rowwise=False):
        """From `Steps.checked_plan`'s rows `(pointers, size, param, layout entry, grad)`."""
        bumped, steps = [], {}
        for _, _, p, entry, _ in rows:
            bumped.append(p)
            bumped.extend(entry.tensors)
            steps.setdefault(_NUMPY[entry.step[0]], []).append(entry.step[1])
        grads, owners = [row[4] for row in rows], [row[2] for row in rows]
        spans = np.array([row[3].spans for row in rows], dtype=np.int64).reshape(len(rows), 6)
        tables = [_rowwise_table(p, g, entry) for _, _, p, entry, g in rows] if rowwise else None
        return cls(ptrs, spans, np.array(sizes, dtype=np.int64), chunks, sum(sizes), grads, owners, bumped, steps,
                   tables)  # fmt: skip


def _rowwise_table(p, g, entry):
    """A param's arrays for the rowwise row shell: `(param, grad, square_avg, grad_avg,
    momentum_buffer, rows, width)`, NumPy views of the tensors (float32/float64, plain)."""
    kept = dict(zip(entry.names, entry.tensors))
    flat = p.detach().numpy().reshape(-1)
    empty = flat[:0]
    rows, width = cpu.all_rows(tuple(p.shape))
    momentum_buffer = kept["momentum_buffer"].numpy().reshape(-1) if "momentum_buffer" in kept else empty
    return flat, g.numpy().reshape(-1), kept["square_avg"].numpy().reshape(-1), empty, momentum_buffer, rows, width


class Steps:
    """What a step needs beyond the optimizer's own state, cached across steps: each group's
    checked options (`hyper_cache`), each param's
    layout (`layouts`, `fastrms.torch._tensors.layout`) and the pointer table last checked
    for overlaps per group, dtype and round (`checked`). `dense_rows` is the optimizer's."""

    def __init__(self, own, stochastic=None, guard=None):
        #: fastrms's own options (`dense_rows`, `state_storage`, `state_layout`), checked with
        #: each group's, and how the state is kept (`fastrms.torch._tensors.Form`)
        self.own, self.dense_rows = own, own["dense_rows"]
        kept = spec.of({"state_storage": own["state_storage"], "state_layout": own["state_layout"]})
        self.form = _tensors.Form(kept.codec, kept.rowwise)
        #: `clip_global_norm` and `skip_nonfinite` (checked), or None when neither is asked for;
        #: the last norm the guard measured and the steps it refused
        self.guard, self.last_norm, self.skipped = guard, None, 0
        #: the seed of stochastic rounding of bfloat16 params (None: they keep float32 masters),
        #: and each param's `stochastic_base` by its place (group << 24 | index)
        self.stochastic, self.bases = stochastic, {}
        self.hyper_cache, self.layouts, self.checked = {}, {}, {}
        self.kept = {}  # each group's `fastrms.torch._fast.Kept`, or None

    def hyperparameters(self, group, where, dtypes):
        """The group's options as fastrms's, checked (`fastrms.torch._options`)."""
        return _options.hyperparameters(self.hyper_cache, group, where, dtypes, self.own)

    def step(self, param_groups, state_of, held):
        """One step over every param of `param_groups` that has a grad (`state_of`: torch's
        per-param state; `held`: the flat buckets, `fastrms.torch._state.Layout`)."""
        for bucket in held.every:  # grads written into a bucket's views from outside backward
            bucket.notice()
        plans = [self.plan(i, group, state_of, held) for i, group in enumerate(param_groups)]  # every check first
        coef = 1.0
        if self.guard is not None:
            found = self.verdict(plans)
            if found.norm is not None:
                self.last_norm = found.norm
            if not found.stepped:  # skip_nonfinite: nothing is written, no step counted
                self.skipped += 1
                return
            coef = found.coef
        bumped, steps = [], {}
        for hyper, rounds, flat, sparse, lagging in plans:
            for args in lagging:  # dense_rows: rows stepped sparsely before, now a dense grad
                _sparse.catch_up(*args, hyper, hyper["learning_rate"])
            for bucket in flat:
                bucket.step(hyper, self.parallel, bumped, coef)
            for members in rounds:
                for dtype, call in members.items():
                    self.run(hyper, dtype, call, bumped, steps, coef)
            for p, table, counters, entry in sparse:
                _sparse.step(hyper, p, table, counters, entry, bumped)
        for dtype, addresses in steps.items():  # each param's `step` += 1, one call per dtype
            kernels.increment(np.array(addresses, dtype=np.int64), np.empty(0, dtype))
        if bumped:
            torch.autograd.graph.increment_version(bumped)

    def verdict(self, plans):
        """The guard's verdict over every grad the `plans` step (each once; `fastrms.torch._guard`)."""
        grads = {}
        for _, rounds, flat, sparse, _ in plans:
            if sparse:
                raise ValueError(
                    "clip_global_norm and skip_nonfinite look at dense grads only; a param has a sparse grad "
                    f"({tuple(sparse[0][0].shape)}): step sparse tables in an optimizer without them"
                )
            for bucket in flat:
                grads.update((id(g), (g, g)) for g in bucket.active_grads())
            for members in rounds:
                for call in members.values():
                    grads.update((id(g), (g, p)) for g, p in zip(call.grads, call.owners))
        pairs = list(grads.values())
        return _guard.verdict(self.guard, [g for g, _ in pairs], [p for _, p in pairs])

    def plan(self, gi, group, state_of, held):
        """The group's checked options, the rounds of its params that have a grad (per dtype,
        a `Call`; a param listed twice goes again in a later round) and its buckets that
        still tile. A group stepped as it was last time (the same params, addresses, state
        and options, every grad fresh and dense: `fastrms.torch._fast.Kept`) reuses its
        pointer tables, its grads checked in one pass per property."""
        kept = self.kept.get(gi)
        if kept is not None and kept.mark is held.seen and state_of is kept.state_of:
            hyper = self.hyperparameters(group, f"param_groups[{gi}]", kept.dtypes)
            if hyper is kept.hyper or spec.of(hyper).names == kept.names:  # a new lr keeps the tables
                found = kept.reuse(group["params"], state_of)
                if found is not None:
                    return hyper, [found], [], [], []
        planned = self.checked_plan(gi, group, state_of, held)
        self.kept[gi] = _fast.Kept.of(planned, group["params"], state_of, held, self)
        return planned

    def checked_plan(self, gi, group, state_of, held):
        """`plan`, each param looked at on its own (its cached layout kept while the param,
        its address, shape and state tensors are); a few C calls per param."""
        where = f"param_groups[{gi}]"
        names = None
        sparse, lagging = [], []  # params with a sparse grad; dense_rows params to catch up first
        dense_rows = self.dense_rows
        flat = []  # flatten=True: whole buckets whose params and grads are still the buffers' views
        for bucket in held.buckets[gi].values():
            if bucket.tiles():
                hyper = self.hyperparameters(group, where, (_NUMPY[bucket.dtype],))
                bucket.prepare(
                    hyper, lambda p, names, address: self.layout(p, names, address, "a param", state_of[p], held)
                )
                flat.append(bucket)
        if len(flat) == len(held.buckets[gi]):  # every bucket tiles: only the params outside them remain
            candidates = held.loose[gi]
        else:
            skip = {id(p) for bucket in flat for p in bucket.params}
            candidates = [(j, p) for j, p in enumerate(group["params"]) if id(p) not in skip]
        rounds = [{}]
        seen = {} if held.repeats[gi] else None
        flat_slot, layouts = held.flat_slot, self.layouts
        for j, p in candidates:
            g = p.grad
            if g is None:
                continue
            if flat_slot:
                slot = flat_slot.get(p)
                if slot is not None and g is slot[0].grads[slot[1]] and not slot[0].active[slot[1]]:
                    continue  # its buffer's zeroed view: no grad since zero_grad(set_to_none=True)
            if not g.is_cpu:
                raise ValueError(f"{where}['params'][{j}]: its grad is on {g.device}; fastrms steps CPU tensors only")
            t = p  # the memory stepped: the param's, or a DTensor's local shard's
            if type(p) not in _tensors.PLAIN:
                t, g = _tensors.local_pair(p, g, f"{where}['params'][{j}]")
            if g.is_sparse:
                if t is not p:
                    raise ValueError(f"{where}['params'][{j}]: a DTensor param with a sparse grad is not supported")
                sparse.append((j, p, g))
                continue
            if not (g.is_contiguous() and t.is_contiguous()):
                _tensors.check_pair(t, g, f"{where}['params'][{j}]")
            dtype = p.dtype
            if names is None or dtype not in _NUMPY:
                if dtype not in _NUMPY:
                    _tensors.check_param(p, f"{where}['params'][{j}]")
                hyper = self.hyperparameters(group, where, (_NUMPY[dtype],))
                names = spec.of(hyper).names
            if g.dtype is not dtype:
                raise ValueError(f"{where}['params'][{j}]: its grad is {g.dtype}, the param {dtype}")
            address, shape = t.data_ptr(), t.shape
            cached = layouts.get(id(p))
            if (  # the cached layout holds while the param, its address, shape and state tensors do
                cached is None
                or cached.param is not p
                or cached.address != address
                or cached.shape != shape
                or cached.names != names
                or not cached.holds(cached.state)
                or (cached.strides is not None and cached.strides != t.stride())
            ):
                name = f"{where}['params'][{j}]"
                if not p.is_cpu:  # a param moved or swapped (torch.utils.swap_tensors) off the CPU
                    raise ValueError(f"{name} is on {p.device}; fastrms.torch.RMSprop steps CPU tensors only")
                if g.shape != shape:  # torch keeps a grad's shape its param's, unless p.data was replaced
                    raise ValueError(f"{name}: its grad has shape {tuple(g.shape)}, the param {tuple(shape)}")
                cached = self.layout(p, names, address, name, state_of[p], held)
            if g.numel() != cached.numel:
                raise ValueError(f"{where}['params'][{j}]: its grad has {g.numel()} elements, the param {cached.numel}")
            if dense_rows and _sparse.ROW_STEP in cached.state:
                lagging.append(_sparse.lagging(p, cached, names, hyper, f"{where}['params'][{j}]"))
            turn = 0
            if seen is not None:
                turn = seen[id(p)] = seen.get(id(p), -1) + 1
                if turn == len(rounds):
                    rounds.append({})
            members = rounds[turn]
            rows = members.get(dtype)
            if rows is None:
                rows = members[dtype] = []
            ptrs = (cached.stepped, g.data_ptr(), *cached.state_ptrs)
            if self.stochastic is not None and dtype is torch.bfloat16:  # this step's noise key, in the sixth column
                ptrs = (*ptrs, storage.step_key(self.base((gi << 24) + j), int(cached.held[-1]) + 1))
            rows.append((ptrs, cached.numel, p, cached, g))
        for turn, members in enumerate(rounds):
            for dtype, rows in members.items():
                ptrs = np.array([row[0] for row in rows], dtype=np.int64)
                sizes = tuple(row[1] for row in rows)
                call = Call.of(rows, ptrs, sizes, cpu.chunks(sizes), self.form.rowwise)
                _tensors.check_overlaps(self.checked, (gi, dtype, turn), call.spans, ptrs, where)
                members[dtype] = call
        sparse = [
            self.sparse_table(group, where, f"{where}['params'][{j}]", p, g, state_of, held) for j, p, g in sparse
        ]
        used = [*(d for m in rounds for d in m), *(b.dtype for b in flat), *(s[0].dtype for s in sparse)]
        dtypes = tuple(dict.fromkeys(_NUMPY[d] for d in used))
        return self.hyperparameters(group, where, dtypes), rounds, flat, sparse, lagging

    def base(self, ident):
        """The `stochastic_base` of the param at place `ident` (computed once)."""
        found = self.bases.get(ident)
        if found is None:
            found = self.bases[ident] = storage.stochastic_base(self.stochastic, ident)
        return found

    def sparse_table(self, group, where, name, p, g, state_of, held):
        """A param with a sparse grad, checked: `(p, rows.Table, row counters, layout)`."""
        _tensors.check_param(p, name)
        if p.dtype in _LOW:
            raise ValueError(
                f"{name}: a {p.dtype} param with a sparse grad; fastrms steps the sparse rows of float32 and "
                "float64 params (a 16-bit param's rows would need its master copy's rows: not supported)"
            )
        if self.form != _tensors.ELEMENTWISE:
            raise ValueError(
                f"{name} has a sparse grad; its rows are stepped by the row kernels, which keep the state in the "
                "param's dtype element by element (state_storage='native', state_layout='elementwise')"
            )
        _sparse.check(p, g, name)
        hyper = self.hyperparameters(group, where, (_NUMPY[p.dtype],))
        names = spec.of(hyper).names
        entry = self.layout(p, names, p.data_ptr(), name, state_of[p], held)
        parallel = runtime.parallel_mode() != "serial"
        table, counters = _sparse.table(p, g, entry.tensors, names, entry.state, self.dense_rows, parallel, name)
        return p, table, counters, entry

    @staticmethod
    def parallel(size, itemsize, hyper):
        """Whether a step of `size` elements runs on the parallel kernels here."""
        return cpu.parallel(size, itemsize, 1 + bool(hyper["centered"]) + bool(hyper["momentum"]))

    def layout(self, p, names, address, name, p_state, held):
        """The cached layout of `p` (see `plan` and `fastrms.torch._tensors.layout`), made anew."""
        stochastic = self.stochastic is not None and p.dtype is torch.bfloat16
        entry = _tensors.layout(p, names, address, name, p_state, held.flat_slot.get(p), stochastic, self.form)
        self.layouts[id(p)] = entry
        return entry

    def run(self, hyper, dtype, call, bumped, steps, coef=1.0):
        """One kernel call (`Call`) for one group, dtype and round, the grads scaled by
        `coef` (the guard's)."""
        key = spec.of(hyper).variant
        bumped.extend(call.bumped)
        for step_dtype, addresses in call.steps.items():
            steps.setdefault(step_dtype, []).extend(addresses)
        ptrs, sizes, chunks = call.ptrs, call.sizes, call.chunks
        witness = np.empty(0, dtype=_NUMPY[dtype])  # what the kernel computes in: a 16-bit param's master's
        parallel = self.parallel(call.total, witness.itemsize, hyper)
        low, codec = _LOW.get(dtype), self.form.codec
        scalars = O.scalars(hyper, hyper["learning_rate"], 1)
        if coef != 1.0:
            scalars = scalars._replace(grad_scale=scalars.grad_scale * coef)
        scalars = tuple(scalars)  # the kernels take a plain tuple (a NamedTuple is typed 2.4x slower)
        if call.tables is not None:  # one value a row: the row shell, one call a param
            cpu.rowwise(key, parallel)(scalars, call.tables)
            return
        if low is None:
            shell = cpu.kernel("segments", key, parallel, codec)
        elif self.stochastic is not None and dtype is torch.bfloat16:  # no master: rounded stochastically
            shell = cpu.kernel("segments", key, parallel, codec, stochastic=True)
        else:  # the float32 masters stepped from 16-bit grads, each param written back in the pass
            copy = storage.MASTERS[low.tag]  # a param written from outside since the last step is its master's value
            shell = cpu.kernel("segments", key, parallel, codec, copy, low)
        shell(scalars, witness, ptrs, sizes, chunks)
