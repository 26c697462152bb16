"""The flat buffers of `fastrms.torch.RMSprop(flatten=True)`: one bucket per param group and
dtype holds its params, grads and state back to back (a private module of
`fastrms.torch`; it imports torch)."""

import operator

import numpy as np
import torch
from torch.optim.optimizer import _get_scalar_dtype

from ..backend import cpu
from ..core import options as O
from ..core import spec
from ..kernels import storage

_GRAD = operator.attrgetter("grad")
_DATA_PTR = torch.Tensor.data_ptr
_NUMEL = torch.Tensor.numel
STATE_NAMES = ("square_avg", "grad_avg", "momentum_buffer")
#: The 16-bit param dtypes, stepped over a float32 master copy in the state (`MASTER`), or
#: rounded stochastically: the codec their grads are read with and the param written with.
LOW = {torch.bfloat16: storage.BFLOAT16, torch.float16: storage.FLOAT16}
#: The state key of a 16-bit param's float32 master copy (apex's and DeepSpeed's master weights).
MASTER = "master_param"


def bits(t):
    """A tensor as the NumPy array its kernels read: itself, or a 16-bit one's bits (uint16)."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype in LOW else t.numpy()


class Bucket:
    """The params of one group and dtype in one flat buffer: each `p.data` and `p.grad` a
    view of the param and grad buffers, the state flat buffers whose views are the per-param
    state torch's `state_dict` holds, and the per-param `step` counters views of one
    vector (of torch's scalar dtype).

    A param *has a grad* as torch means it: backward reached it since the last
    `zero_grad(set_to_none=True)` (a post-accumulate-grad hook marks it), or it had a grad
    when it was bucketed, or the last `zero_grad` kept the grads (`set_to_none=False`).
    Only those params move and get state; its grad view stays in place either way (reading as
    zeros where torch would give None), so backward keeps accumulating into the buffer.

    bfloat16 and float16 params keep their state, and their float32 masters (`MASTER`), in
    float32 buffers, and one call steps the masters from the 16-bit grad buffer and writes
    the param buffer back; with `stochastic` (the optimizer's seed) bfloat16 params keep no
    master and are stepped through the chunk table with each param's noise key, the bits of
    stepping them unflattened."""

    def __init__(self, params, stochastic=None, idents=None):
        self.params = params
        #: each param's place in the optimizer (group index << 24 + index in the group): its noise key's
        self.idents = list(range(len(params))) if idents is None else idents
        self.bases = None  # their `stochastic_base`s, once needed
        self.dtype = params[0].dtype
        self.low = LOW.get(self.dtype)  # the 16-bit codec, or None
        self.stochastic = stochastic if self.dtype is torch.bfloat16 else None
        self.state_dtype = torch.float32 if self.low is not None else self.dtype
        self.sizes = [p.numel() for p in params]
        self.offsets = np.concatenate(([0], np.cumsum(self.sizes)[:-1])).astype(int).tolist()
        n = sum(self.sizes)
        self.param_flat = torch.empty(n, dtype=self.dtype)
        self.grad_flat = torch.zeros(n, dtype=self.dtype)
        self.grads = []
        self.active = np.zeros(len(params), dtype=bool)
        with torch.no_grad():
            for i, (p, o, k) in enumerate(zip(params, self.offsets, self.sizes)):
                view = self.param_flat[o : o + k].view(p.shape)
                view.copy_(p)
                p.data = view
                grad = self.grad_flat[o : o + k].view(p.shape)
                if p.grad is not None:
                    grad.copy_(p.grad)
                    self.active[i] = True
                p.grad = grad
                self.grads.append(grad)
                p.register_post_accumulate_grad_hook(self._marker(i))
        self.addresses = [p.data_ptr() for p in params]
        self.param_np, self.grad_np = bits(self.param_flat), bits(self.grad_flat)
        self.state, self.state_np = {}, {}
        self.steps = torch.zeros(len(params), dtype=_get_scalar_dtype())
        self.steps_np = self.steps.numpy()
        self.has_state = np.zeros(len(params), dtype=bool)
        self.written = self.grad_flat._version  # the grad buffer's version when `active` was last brought up to date
        self.names = self.hyper = self.key = self.scalars = self.plain = None
        self._subset = (None, None)  # (active mask bytes, the chunk table over those params)

    def _marker(self, i):
        active = self.active

        def mark(_param):
            active[i] = True

        return mark

    def notice(self):
        """Mark as having a grad the params whose grad view was written from outside
        backward (`p.grad += g`, `p.grad.copy_(g)`) since `zero_grad`: the buffer's version
        moved, and the view of a param backward did not reach is no longer all zeros. Reads
        only those views, and only when the version moved."""
        version = self.grad_flat._version
        if version == self.written:
            return
        self.written = version
        active = self.active
        if active.all():
            return
        for i in np.flatnonzero(~active):
            if self.grads[i].any():
                active[i] = True

    def tiles(self):
        """Whether every param and grad is still the view this bucket made: the grad object,
        the data address and the size (three reads per param)."""
        params = self.params
        return (
            all(map(operator.is_, map(_GRAD, params), self.grads))
            and list(map(_DATA_PTR, params)) == self.addresses
            and list(map(_NUMEL, params)) == self.sizes
        )

    def state_view(self, name, i):
        """Param `i`'s view of state buffer `name` (zeros, as torch starts it; a master
        starts as the params)."""
        if name not in self.state:
            if name == MASTER:
                self.state[name] = self.param_flat.to(torch.float32)
            else:
                self.state[name] = torch.zeros(self.param_flat.numel(), dtype=self.state_dtype)
            self.state_np[name] = self.state[name].numpy()
        o, k = self.offsets[i], self.sizes[i]
        return self.state[name][o : o + k].view(self.params[i].shape)

    def prepare(self, hyper, layout):
        """Make sure every param that has a grad has its state, as views of the buffers
        (`layout` is the optimizer's, which creates and checks it)."""
        names = spec.of(hyper).names
        fresh = self.active & ~self.has_state
        if self.names != names:
            fresh = self.active.copy()
            self.names = names
        for i in np.flatnonzero(fresh):
            layout(self.params[i], names, self.params[i].data_ptr())
            self.has_state[i] = True
        if hyper is not self.hyper:  # the optimizer caches each distinct set of options: one object
            self.hyper, self.key = hyper, spec.of(hyper).variant
            self.scalars = O.scalars(hyper, hyper["learning_rate"], 1)
            self.plain = tuple(self.scalars)  # as the kernels take them (a NamedTuple is typed 2.4x slower)

    def adopt(self, i, state):
        """After `load_state_dict`: copy param `i`'s loaded state into the buffers and
        point the state at their views again."""
        with torch.no_grad():
            for name in (*STATE_NAMES, MASTER):
                if name in state:
                    view = self.state_view(name, i)
                    view.copy_(state[name])
                    state[name] = view
            if "step" in state:
                self.steps[i] = float(state["step"])
                state["step"] = self.steps[i]
        self.has_state[i] = bool(state)
        self.names = self.hyper = None

    def zero_grads(self, set_to_none):
        """Zero the grad buffer in place; with `set_to_none` no param has a grad until
        backward reaches it again."""
        self.grad_flat.zero_()
        for p, grad in zip(self.params, self.grads):
            if p.grad is not grad:
                p.grad = grad
        self.active[:] = not set_to_none
        self.written = self.grad_flat._version

    def zero_grad_of(self, i, set_to_none):
        """`zero_grads` for param `i` alone."""
        grad = self.grads[i]
        self.notice()  # the other views' writes are theirs
        grad.zero_()
        if self.params[i].grad is not grad:
            self.params[i].grad = grad
        self.active[i] = not set_to_none
        self.written = self.grad_flat._version

    def active_grads(self):
        """The grads a step reads: the whole buffer, or the views of the params that have one."""
        if self.active.all():
            return [self.grad_flat]
        return [self.grads[i] for i in np.flatnonzero(self.active)]

    def step(self, hyper, parallel_mode, bumped, coef=1.0):
        """One kernel call over the params that have a grad (after `prepare`): a dense
        call over the whole buffer when all have one, else a chunk table over those; the
        grads scaled by `coef` (the guard's)."""
        active = self.active
        if not active.any():
            return
        key = self.key
        everyone = bool(active.all()) and self.stochastic is None  # stochastic: each param's own key
        n = self.param_np.size if everyone else int(np.dot(active, self.sizes))
        master = self.low is not None and self.stochastic is None
        parallel = parallel_mode(n, 4 if self.low is not None else self.param_np.itemsize, hyper)
        copy = storage.MASTERS[self.low.tag] if master else None  # a param written from outside is its master's value
        if everyone:
            empty = self.state_np["square_avg"][:0]
            arrays = (
                self.state_np[MASTER] if master else self.param_np,
                self.grad_np,
                self.state_np["square_avg"],
                self.state_np.get("grad_avg", empty) if key.uses_grad_avg else empty,
                self.state_np.get("momentum_buffer", empty) if key.uses_momentum_buffer else empty,
            )
            if master:
                arrays = (*arrays, self.param_np)  # the 16-bit params, written from their masters
            shell = cpu.kernel("dense", key, parallel, storage.NATIVE, copy, self.low or storage.NATIVE)
            call = arrays
            self.steps_np += self.steps_np.dtype.type(1.0)
        else:
            ptrs, sizes, chunks = self._table(active)
            if self.stochastic is not None:
                ptrs = ptrs.copy()
                if self.bases is None:
                    self.bases = [storage.stochastic_base(self.stochastic, ident) for ident in self.idents]
                steps = self.steps_np
                ptrs[:, 5] = [storage.step_key(self.bases[i], int(steps[i]) + 1) for i in np.flatnonzero(active)]
                shell = cpu.kernel("segments", key, parallel, stochastic=True)
            else:
                shell = cpu.kernel("segments", key, parallel, storage.NATIVE, copy, self.low or storage.NATIVE)
            call = (self.state_np["square_avg"][:0], ptrs, sizes, chunks)
            self.steps_np[active] += self.steps_np.dtype.type(1.0)
        scalars = self.plain if coef == 1.0 else tuple(self.scalars._replace(grad_scale=self.scalars.grad_scale * coef))
        shell(scalars, *call)
        bumped.append(self.param_flat)  # views share their base's version counter
        bumped.extend(self.state[name] for name in (*self.names, MASTER) if name in self.state)

    def _table(self, active):
        """The pointer table (`kernels.segments`) over the params that have a grad: column 0
        the param (or its master), 1 the grad, 2-4 the state, 5 a 16-bit param beside its master."""
        master = self.low is not None and self.stochastic is None
        state = [self.state[name].data_ptr() if name in self.state else 0 for name in STATE_NAMES]
        bases = [self.state[MASTER].data_ptr() if master else self.param_flat.data_ptr(), self.grad_flat.data_ptr(),
                 *state, self.param_flat.data_ptr() if master else 0]  # fmt: skip
        size = self.param_flat.element_size()
        widths = [4 if master else size, size, *[self.state_dtype.itemsize] * 3, size]
        mask = (active.tobytes(), tuple(bases))
        if self._subset[0] == mask:
            return self._subset[1]
        rows = [[b + self.offsets[i] * w if b else 0 for b, w in zip(bases, widths)] for i in np.flatnonzero(active)]
        ptrs = np.array(rows, dtype=np.int64)
        sizes = np.array([self.sizes[i] for i in np.flatnonzero(active)], dtype=np.int64)
        table = (ptrs, sizes, cpu.chunks(tuple(sizes.tolist())))
        self._subset = (mask, table)
        return table
