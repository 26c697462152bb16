"""How an optimizer's arrays are laid out for the kernels, and `pack`.

Each param gets a `Slot`: the user's array, a plain 1-D view of it, and its state,
allocated once. Params of one dtype form a `Group` that one kernel call steps:

- `dense`: a single array, the in-place dense shell;
- `segments`: several arrays, the chunk-table shell (`fastrms.kernels.segments`);
- `flat`: several arrays that tile one buffer back to back (as `pack` makes them);
  their state is allocated as one buffer too, so a step whose grads tile one buffer in the
  same layout is one dense call over the whole span: exactly one array's cost;
- `rowwise` (`state_layout="rowwise"`): each array as a table of rows, stepped by the row
  shell over all its rows (one `square_avg` value a row).
"""

import numpy as np

from .. import kernels
from ..core.checks import flat_view
from ..core.memory import address

#: State kinds in the order of the chunk table's columns after param and grad.
_STATE = ("square_avg", "grad_avg", "momentum_buffer")


class Slot:
    """One parameter array and its state (flat, allocated once, or views into its group's
    buffers when the group is `flat`)."""

    __slots__ = (
        "param",
        "array",
        "shape",
        "dtype",
        "flat",
        "square_avg",
        "grad_avg",
        "momentum_buffer",
        "names",
        "row_step",
        "copy",
    )

    def __init__(self, param, array, names):
        # param: the user's own object (returned by .params); array: a plain ndarray view of it
        self.param, self.array, self.shape, self.dtype = param, array, array.shape, array.dtype
        self.flat = flat_view(array)
        self.names = names
        self.square_avg = self.grad_avg = self.momentum_buffer = self.flat[:0]
        #: `dense_rows`: for a 2-D param, the step that last touched each row (else empty)
        self.row_step = np.zeros(0, np.int64)
        #: `copy_to`: the flat uint16 view of the param's low-precision copy (else empty)
        self.copy = np.zeros(0, np.uint16)

    @property
    def owned(self):
        """The non-empty arrays the step writes: param, state and the copy."""
        return tuple(a for a in (self.flat, *(getattr(self, n) for n in self.names), self.copy) if a.size)


def _root(a):
    """The ndarray that owns `a`'s memory (`a` itself when it owns it)."""
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    return root


def grad_span(first, start, size):
    """A 1-D view of `size` elements from address `start` (where `first` begins), taken
    from the ndarray that owns `first`'s memory, or None when that array does not hold the
    whole span (grads that only happen to be adjacent in memory)."""
    root = _root(first)
    if root is first or root.dtype != first.dtype or not root.flags.c_contiguous or not root.size:
        return None
    offset, rem = divmod(start - address(root), first.itemsize)
    if rem or offset < 0 or offset + size > root.size:
        return None
    return root.reshape(-1)[offset : offset + size]


def _tile_root(arrays, dtype):
    """The 1-D span of one buffer that `arrays` tile back to back, in order, or None."""
    if len(arrays) < 2 or any(a.size == 0 for a in arrays):
        return None
    root = _root(arrays[0])
    if root is arrays[0] or type(root) is not np.ndarray or root.dtype != dtype or not root.flags.c_contiguous:
        return None
    if not root.flags.writeable:
        return None
    start = address(arrays[0])
    at = start
    for a in arrays:
        if address(a) != at or a.base is None:
            return None
        at += a.nbytes
    offset, rem = divmod(start - address(root), dtype.itemsize)
    total = (at - start) // dtype.itemsize
    if rem or offset < 0 or offset + total > root.size:
        return None
    return root.reshape(-1)[offset : offset + total]


class Group:
    """Params of one dtype, stepped by one kernel call."""

    def __init__(self, indices, slots, hyper, spec, copy=None):
        self.indices, self.slots = indices, slots
        self.dtype = slots[0].dtype
        #: the codec of the params' copies (`copy_to`), or None
        self.copy = copy
        names = spec.names
        size = sum(s.flat.size for s in slots)
        self.big = kernels.step_bytes(size, self.dtype.itemsize, len(names)) >= kernels.PARALLEL_MIN_BYTES
        # params that tile one buffer step as one array, unless each has its own copy to write
        # or its state starts on a block of its own (8-bit state)
        tiles = len(slots) > 1 and copy is None and not spec.codec.block and not spec.rowwise
        span = _tile_root([s.array for s in slots], self.dtype) if tiles else None
        self.kind = "dense" if len(slots) == 1 else ("flat" if span is not None else "segments")
        if spec.rowwise:  # `state_layout="rowwise"`: the row shell steps each param, over all its rows
            self.kind = "rowwise"
        # state: one buffer per kind for the whole group; each slot's state is a view of it
        sizes = {kept.name: [kept.size(s.shape) for s in slots] for kept in spec.state}
        state = spec.allocate({k: sum(v) for k, v in sizes.items()}, self.dtype, hyper["initial_scale"])
        for name in names:
            offset = 0
            for s, n in zip(slots, sizes[name]):
                setattr(s, name, state[name][offset : offset + n])
                offset += n
        self.span = None
        if span is not None:
            self.span = Slot(span, span, names)
            for name in names:
                setattr(self.span, name, state[name])
        #: rowwise: each param's `(rows, width)` as a table
        self.row_tables = [all_rows(s.shape) for s in slots] if spec.rowwise else []
        self.witness = slots[0].flat[:0]
        self.sizes = np.array([s.flat.size for s in slots], dtype=np.int64)
        self.chunks = kernels.chunk_table(self.sizes)
        #: each array's byte offset from the first: where its grad lies in a flat grad buffer
        self.offsets = np.concatenate(([0], np.cumsum([s.flat.nbytes for s in slots])[:-1])).astype(np.int64)
        self.ptrs = np.zeros((len(slots), 6), dtype=np.int64)  # the chunk table's columns (segments)
        for a, s in enumerate(slots):
            self.ptrs[a, 0] = address(s.flat) if s.flat.size else 0
            for col, name in enumerate(_STATE, start=2):
                arr = getattr(s, name)
                self.ptrs[a, col] = address(arr) if arr.size else 0
            self.ptrs[a, 5] = address(s.copy) if s.copy.size else 0

    def grads_tile(self, addresses):
        """Whether grads at `addresses` lie back to back in the params' layout."""
        start = addresses[0]
        at = start
        for s, addr in zip(self.slots, addresses):
            if addr != at:
                return False
            at += s.flat.nbytes
        return True


def all_rows(shape):
    """`(rows, width)` of a param of `shape` seen as a table: every row index of its first
    axis (one row for a 0-d param) and the elements a row holds."""
    n = shape[0] if len(shape) else 1
    width = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) else 1
    return np.arange(n, dtype=np.int64), width


def pack(arrays):
    """Copy `arrays` (float32 or float64, all of one dtype, any shapes) into one contiguous
    1-D buffer; returns `(flat, views)`, `views` shaped like the inputs and sharing
    `flat`'s memory. An `fastrms.RMSprop` over the views keeps its state in one
    buffer too, and a step whose grads also tile one buffer in the same layout (say the views
    of another `pack`) is one kernel call over `flat`: one array's cost, whatever the
    number of arrays."""
    if isinstance(arrays, np.ndarray) or not hasattr(arrays, "__iter__"):
        raise TypeError(f"arrays must be a sequence of numpy arrays, got {type(arrays).__name__}")
    arrays = list(arrays)
    if not arrays:
        raise ValueError("arrays must hold at least one array, got an empty sequence")
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray) or isinstance(a, np.ma.MaskedArray):
            raise TypeError(f"arrays[{i}] must be a plain numpy.ndarray, got {type(a).__name__}")
        if a.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"arrays[{i}] must have dtype float32 or float64, got {a.dtype}")
        if a.dtype != arrays[0].dtype:
            raise TypeError(f"arrays must all have one dtype: arrays[0] is {arrays[0].dtype}, arrays[{i}] is {a.dtype}")
    flat = np.empty(sum(a.size for a in arrays), dtype=arrays[0].dtype)
    views, offset = [], 0
    for a in arrays:
        view = flat[offset : offset + a.size].reshape(a.shape)
        view[...] = a
        views.append(view)
        offset += a.size
    return flat, views
