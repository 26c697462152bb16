"""What a step of the NumPy optimizer reads and writes, checked before anything is written:
each grad against its param (a plain C-contiguous, aligned ndarray of the param's dtype and
shape; for float32 params also bfloat16 or float16, `low_codec`), and no grad or row block
sharing memory with a param or the state (the step writes those while it reads the grads).
Params may not share memory with each other either."""

import bisect

import numpy as np

from ..kernels import contiguous_address, storage
from .checks import float_array

_FLOAT32 = np.dtype(np.float32)

__all__ = [
    "Owned",
    "check_grad",
    "check_grads",
    "copies",
    "disjoint",
    "grad_name",
    "low_codec",
    "param_arrays",
    "param_name",
    "span",
    "step_grads",
    "writeable",
]


def address(a):
    """The address of `a`'s first element."""
    return a.__array_interface__["data"][0]


def grad_name(index):
    """How an error names grad `index` (None: the only one)."""
    return "grads" if index is None else f"grads[{index}]"


def param_name(single, index):
    """How an error names param `index` (`single`: the optimizer's only array)."""
    return "params" if single else f"params[{index}]"


def writeable(slot, single, index):
    """Refuse a param the caller made read-only after construction (the step writes it)."""
    if not slot.param.flags.writeable:
        raise ValueError(f"{param_name(single, index)} was made read-only after construction")


def span(a):
    """`(start, end)`: the bytes `a` (contiguous) occupies."""
    start = address(a)
    return start, start + a.nbytes


def iterable(params):
    """Whether `params` is a collection or iterator of arrays (not one array, a string or a dict)."""
    return not isinstance(params, (np.ndarray, str, bytes, dict)) and hasattr(params, "__iter__")


def param_arrays(params):
    """`(single, given, arrays)`: whether `params` is one ndarray, the user's objects, and
    each checked (`float_array`: float32/float64, C-contiguous, writeable) as a plain
    ndarray; params that share memory are refused (`disjoint`)."""
    single = isinstance(params, np.ndarray)
    if not single and not iterable(params):
        raise TypeError(f"params must be an ndarray or a sequence of ndarrays, got {type(params).__name__}")
    given = [params] if single else list(params)
    arrays = [float_array(param_name(single, i), p, writeable=True) for i, p in enumerate(given)]
    disjoint(arrays)
    return single, given, arrays


def low_params(params):
    """For params of 16-bit floats (`ml_dtypes.bfloat16` or `numpy.float16`, all of one
    dtype): `(single, given, masters, views, codec)`, with a float32 master for each (a copy
    of its values, the optimizer's own) and each param's flat uint16 view (the copy the step
    writes); None when no param is 16-bit. TypeError for a mix of 16-bit and other params;
    ValueError for one that is not C-contiguous, aligned and writeable, or that shares memory
    with another."""
    single = isinstance(params, np.ndarray)
    if not single and not iterable(params):
        return None
    given = [params] if single else list(params)
    codecs = [low_codec(p.dtype) if isinstance(p, np.ndarray) else None for p in given]
    if not any(codecs):
        return None
    first = next(i for i, c in enumerate(codecs) if c is not None)
    for i, (p, c) in enumerate(zip(given, codecs)):
        if c is not codecs[first]:
            kind = str(p.dtype) if isinstance(p, np.ndarray) else type(p).__name__
            raise TypeError(
                f"{param_name(single, i)} is {kind}, {param_name(single, first)} {given[first].dtype}: 16-bit params "
                "are all of one dtype (bfloat16 or float16), each with a float32 master; for a mix, keep float32 "
                "masters yourself and pass the 16-bit arrays as copy_to"
            )
        if isinstance(p, np.ma.MaskedArray):
            raise TypeError(f"{param_name(single, i)} must be a plain numpy.ndarray, got a masked array")
        if not (p.flags.c_contiguous and p.flags.aligned and p.flags.writeable):
            raise ValueError(
                f"{param_name(single, i)} must be C-contiguous, aligned and writeable: the step writes it in place"
            )
    views = [p.view(np.ndarray).view(np.uint16).reshape(-1) for p in given]
    disjoint(views)
    masters = [np.array(p, dtype=np.float32, order="C") for p in given]  # a copy, of the param's shape (0-d too)
    return single, given, masters, views, codecs[first]


def disjoint(arrays):
    """Refuse params that share memory (each must be its own array): one sort."""
    spans = sorted((*span(a), i) for i, a in enumerate(arrays) if a.size)
    for (_, end, i), (start, _, j) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"params[{min(i, j)}] and params[{max(i, j)}] share memory; each must be its own array")


class Owned:
    """The sorted, disjoint byte spans of what a step writes (params and state), searched for
    a grad that overlaps them: one bisection for one array, one `searchsorted` for many."""

    __slots__ = ("starts", "ends", "_starts", "_ends", "_nbytes")

    def __init__(self, slots):
        owned = sorted(span(a) for s in slots for a in s.owned)
        self.starts = [start for start, _ in owned]
        self.ends = [end for _, end in owned]
        self._starts = np.array(self.starts, dtype=np.int64)
        self._ends = np.array(self.ends, dtype=np.int64)
        self._nbytes = np.array([s.flat.nbytes for s in slots], dtype=np.int64)

    def overlaps(self, start, nbytes):
        """Whether the `nbytes` from address `start` share memory with a param or the state."""
        k = bisect.bisect_left(self.starts, start + nbytes) - 1
        return bool(nbytes) and k >= 0 and self.ends[k] > start

    def check(self, checked, slots, index, low=()):
        """Refuse a grad of `checked` (`(grad, address)` per slot of `slots`: every param's, or
        one) that shares memory with a param or the state; `index` names a lone grad. `low`:
        the indices of 16-bit grads (fewer bytes than their params'), else empty."""
        if not self.starts:  # every array is empty: nothing to overlap
            return
        if len(checked) == 1:
            (g, start), slot = checked[0], slots[0]
            if self.overlaps(start, g.nbytes if low else slot.flat.nbytes):
                raise overlap(index)
            return
        starts = np.fromiter((a for _, a in checked), dtype=np.int64, count=len(checked))
        nbytes = np.array([g.nbytes for g, _ in checked], dtype=np.int64) if low else self._nbytes
        k = np.searchsorted(self._starts, starts + nbytes) - 1
        hit = (nbytes > 0) & (k >= 0) & (self._ends[np.maximum(k, 0)] > starts)
        if hit.any():
            raise overlap(int(np.argmax(hit)))


def overlap(index, name=None):
    """The error for grad `index` (or the argument `name`) sharing memory with what the step writes."""
    return ValueError(
        f"{name or grad_name(index)} shares memory with the params or the optimizer state; pass a separate array"
    )


def low_codec(dtype):
    """The codec (`fastrms.kernels.storage.ARRAYS`) of a 16-bit float dtype a float32 step
    reads or writes, `ml_dtypes.bfloat16` or NumPy's float16 in native byte order, else None."""
    if dtype.itemsize != 2 or not dtype.isnative:
        return None
    return storage.ARRAYS.get(dtype.name)


def check_grad(g, slot, index):
    """`(g, address)`: `g` checked against its param (a plain C-contiguous, aligned ndarray
    of its dtype, or of bfloat16 or float16 for a float32 param) and the address of its data.
    The argument is named only when an error is raised, to keep the per-step cost to a few
    attribute reads and one Numba call."""
    if type(g) is not np.ndarray:
        if not isinstance(g, np.ndarray):
            raise TypeError(f"{grad_name(index)} must be a numpy.ndarray, got {type(g).__name__}")
        if slot.dtype == _FLOAT32 and low_codec(g.dtype) is not None and not isinstance(g, np.ma.MaskedArray):
            g = g.view(np.ndarray)  # a subclass of a 16-bit grad: viewed as a plain ndarray
        else:
            g = float_array(grad_name(index), g, writeable=False)  # a subclass: viewed as a plain ndarray
    bits = g
    if g.dtype is not slot.dtype and g.dtype != slot.dtype:  # builtin dtypes are singletons
        if slot.dtype != _FLOAT32 or low_codec(g.dtype) is None:
            also = " (or bfloat16 or float16)" if slot.dtype == _FLOAT32 else ""
            raise TypeError(f"{grad_name(index)} must have dtype {slot.dtype} like its param{also}, got {g.dtype}")
        bits = g.view(np.uint16)  # Numba reads 16-bit floats as their bits
    if g.shape != slot.shape:
        raise ValueError(f"{grad_name(index)} must have shape {slot.shape} like its param, got {g.shape}")
    start = contiguous_address(bits)
    if start < 0:
        raise ValueError(f"{grad_name(index)} must be C-contiguous (use np.ascontiguousarray), got strides {g.strides}")
    if start % g.dtype.itemsize:
        raise ValueError(f"{grad_name(index)} must be aligned to its dtype's size (np.require(g, requirements='A'))")
    return g, start


def check_grads(grads, slots):
    """`(checked, low)`: `check_grad` for each grad, with the common case (a plain ndarray
    of the param's dtype and shape, C-contiguous and aligned) inlined: this loop is the whole
    per-array cost of a many-array step in Python. `low` lists the indices of the 16-bit
    grads (empty when there are none)."""
    out, low = [], []
    append = out.append
    for i, (g, s) in enumerate(zip(grads, slots)):
        if type(g) is np.ndarray and g.dtype is s.dtype and g.shape == s.shape:
            start = contiguous_address(g)
            if start >= 0 and not start % s.dtype.itemsize:
                append((g, start))
                continue
        checked = check_grad(g, s, i)  # the slow path: it names what is wrong
        if checked[0].dtype != s.dtype:
            low.append(i)
        append(checked)
    return out, low


def copies(copy_to, arrays, single):
    """`copy_to` checked as the low-precision copies of the params `arrays` (float32): the
    same structure (one array, or a sequence of as many), each a writeable C-contiguous
    `ml_dtypes.bfloat16` or `numpy.float16` array of its param's shape, all of one dtype,
    sharing memory with no param and no other copy. Returns `(views, codec)`: each copy's
    flat uint16 view (the bits the kernels write) and their codec
    (`fastrms.kernels.storage.ARRAYS`)."""
    given = [copy_to] if single else copy_to
    if single and not isinstance(copy_to, np.ndarray):
        raise TypeError(f"copy_to must be a numpy.ndarray like params, got {type(copy_to).__name__}")
    if not single and (not isinstance(given, (list, tuple)) or len(given) != len(arrays)):
        got = f"{len(given)} arrays" if isinstance(given, (list, tuple)) else type(given).__name__
        raise TypeError(f"copy_to must be a list or tuple of {len(arrays)} arrays, one per param, got {got}")
    out, codec = [], None
    for i, (c, a) in enumerate(zip(given, arrays)):
        name = "copy_to" if single else f"copy_to[{i}]"
        if not isinstance(c, np.ndarray) or low_codec(c.dtype) is None:
            kind = str(c.dtype) if isinstance(c, np.ndarray) else type(c).__name__
            raise TypeError(f"{name} must be an ml_dtypes.bfloat16 or numpy.float16 array, got {kind}")
        if codec is not None and low_codec(c.dtype) is not codec:
            raise TypeError(
                f"copy_to's arrays must all have one dtype: copy_to[0] is {given[0].dtype}, {name} {c.dtype}"
            )
        codec = low_codec(c.dtype)
        if a.dtype != np.float32:
            raise TypeError(f"{name}: a {c.dtype} copy is of float32 params; {param_name(single, i)} is {a.dtype}")
        if c.shape != a.shape:
            raise ValueError(f"{name} must have its param's shape {a.shape}, got {c.shape}")
        if not (c.flags.c_contiguous and c.flags.aligned and c.flags.writeable):
            raise ValueError(f"{name} must be C-contiguous, aligned and writeable: the step writes it in place")
        out.append(c.view(np.uint16).reshape(-1))
    spans = sorted(
        [(*span(a), param_name(single, i)) for i, a in enumerate(arrays) if a.size]
        + [(*span(c), "copy_to" if single else f"copy_to[{i}]") for i, c in enumerate(out) if c.size]
    )
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{a} and {b} share memory; each copy must be its own array")
    return out, codec


def step_grads(grads, slots, packed):
    """`(checked, slots, low)`: a step's grads checked (`check_grads`) with the slots they go
    with, and the indices of the 16-bit ones: a list or tuple of one array per slot, or, for
    params that tile one buffer (`packed`, a `fastrms.backend.layout.Group`, else None), one flat
    grad array of that buffer's size."""
    if packed is not None and isinstance(grads, np.ndarray):
        checked = check_grad(grads, packed.span, None)
        return (checked,), (packed.span,), [0] if checked[0].dtype != packed.span.dtype else []
    if not isinstance(grads, (list, tuple)):
        raise TypeError(
            f"grads must be a list or tuple of {len(slots)} arrays"
            + (" (or one flat array, for params that tile one buffer)" if packed else "")
            + f", got {type(grads).__name__}"
        )
    if len(grads) != len(slots):
        raise ValueError(f"grads must hold {len(slots)} arrays, one per param, got {len(grads)}")
    checked, low = check_grads(grads, slots)
    return checked, slots, low
