"""The CPU backend of `fastrms.RMSprop`: where and how each step's kernels run.

`Plan(slots, hyper, spec)` groups the params by dtype (`fastrms.layout.Group`: one
kernel call a group, with its pointer table) and picks each group's kernels for this
process: serial below `fastrms.kernels.PARALLEL_MIN_BYTES`, else parallel, or parallel
behind the process-wide lock under `workqueue` (`fastrms.runtime.shell`/`locked`), picked
again whenever `fastrms.runtime.generation` changes (after a fork). A step is then

    calls = plan.calls(checked, clipping)        # which shell steps each group, with what
    verdict = plan.verdict(calls, grads, options)  # the guard over those calls' reductions
    plan.run(calls, scalars)                     # one kernel call per group

The optimizer validates; the plan only runs what it is given. A backend for another
device is another module with this interface.
"""

from . import clipping, kernels, runtime
from .layout import Group, grad_span

__all__ = ["Plan"]


class Plan:
    """The groups of an optimizer's params and the kernels each runs on here."""

    __slots__ = ("groups", "group_of", "packed", "chosen", "generation", "_variant", "_codec", "_rows")

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
        self.choose(spec.variant)

    def choose(self, variant):
        """Give each group its kernels for this process's parallel mode: `{"dense": (update,
        nonfinite, sumsq), "segments": (...)}` and whether they are the parallel ones. Starts
        the thread pool for big arrays: a threading layer that cannot start fails here."""
        self._variant = variant
        generation = runtime.generation()
        mode = runtime.parallel_mode() if any(g.big for g in self.groups) else "free"
        chosen = []
        for group in self.groups:
            parallel = group.big and mode != "serial"
            pairs = {
                "dense": (
                    kernels.dense(variant, parallel, self._codec, group.copy),
                    kernels.nonfinite_parallel if parallel else kernels.nonfinite_serial,
                    kernels.sumsq_parallel if parallel else kernels.sumsq_serial,
                ),
                "segments": (
                    kernels.segments(variant, parallel, self._codec, group.copy),
                    kernels.nonfinite_segments_parallel if parallel else kernels.nonfinite_segments_serial,
                    kernels.sumsq_segments_parallel if parallel else kernels.sumsq_segments_serial,
                ),
            }
            chosen.append(({k: tuple(runtime.locked(f, parallel) for f in fns) for k, fns in pairs.items()}, parallel))
        self.chosen = chosen
        self._rows = {}  # step_rows's kernels, by (kind, parallel): chosen again with the rest
        self.generation = generation

    def current(self):
        """Choose again if the process's parallel mode may have changed (one global read)."""
        if self.generation != runtime.generation():
            self.choose(self._variant)

    def update(self):
        """The first group's in-place dense kernel (an optimizer over one array)."""
        return self.chosen[0][0]["dense"][0]

    def parallel_of(self, index):
        """Whether param `index`'s group runs on the parallel kernels."""
        return self.chosen[self.group_of[index]][1]

    def parallel_flags(self, count):
        """For each of the `count` params, whether its group runs on the parallel kernels now."""
        self.current()
        return [self.parallel_of(i) for i in range(count)]

    @staticmethod
    def calls(groups, checked, clipping):
        """`(shell, arrays, check arrays, norm arrays)` for each group: which shell steps it,
        with what. The norm (`clipping`) is always summed per array (a chunk table for
        several), so its bits do not depend on which shell steps the group."""
        out = []
        for group in groups:
            if group.kind == "dense":
                s = group.slots[0]
                g = checked[group.indices[0]][0].reshape(-1)
                arrays = (s.flat, g, s.square_avg, s.grad_avg, s.momentum_buffer)
                out.append(("dense", arrays if group.copy is None else (*arrays, s.copy), (g,), (g,)))
                continue
            addresses = [checked[i][1] for i in group.indices]
            table = (group.witness, group.ptrs, group.sizes, group.chunks)
            span = group.span
            if span is not None and group.grads_tile(addresses):
                g = grad_span(checked[group.indices[0]][0], addresses[0], span.flat.size)
                if g is not None:
                    if clipping:
                        group.ptrs[:, 1] = addresses
                    arrays = (span.flat, g, span.square_avg, span.grad_avg, span.momentum_buffer)
                    out.append(("dense", arrays, (g,), table if clipping else None))
                    continue
            group.ptrs[:, 1] = addresses
            out.append(("segments", table, table, table))
        return out

    def packed_call(self, checked, clipping):
        """The one call of params that tile one buffer, stepped with one flat grad."""
        packed = self.packed
        span, g = packed.span, checked[0][0]
        arrays = (span.flat, g, span.square_avg, span.grad_avg, span.momentum_buffer)
        table = None
        if clipping:  # the norm is summed per array: the chunk table
            packed.ptrs[:, 1] = packed.offsets + checked[0][1]
            table = (packed.witness, packed.ptrs, packed.sizes, packed.chunks)
        return [("dense", arrays, (g,), table)]

    def verdict(self, calls, checked, options):
        """The guard (`fastrms.clipping.guard`) over `calls`: the groups' sums of squares
        added in order (reproducible), their non-finite checks, the grads for the overflow
        path."""
        chosen = self.chosen
        return clipping.guard(
            lambda: sum(
                pairs["dense" if len(norm_args) == 1 else "segments"][2](*norm_args)
                for (pairs, _), (_, _, _, norm_args) in zip(chosen, calls)
            ),
            lambda: any(pairs[shell][1](*args) for (pairs, _), (shell, _, args, _) in zip(chosen, calls)),
            lambda: [g for g, _ in checked],
            options,
        )

    def run(self, calls, scalars):
        """One kernel call per group."""
        for (pairs, _), (shell, args, _, _) in zip(self.chosen, calls):
            pairs[shell][0](*args, *scalars)

    def row_kernel(self, make, parallel):
        """`runtime.shell(make, variant, parallel)` for `step_rows`, kept until `choose` runs
        again."""
        shell = self._rows.get((make, parallel))
        if shell is None:
            shell = self._rows[(make, parallel)] = runtime.shell(make, self._variant, parallel)
        return shell
