"""The CUDA backend: where and how a step of params that live on a CUDA device runs.

`Plan(params, spec)` groups the params by dtype, gives each its state on the device and
its pointer and chunk tables (`fastrms.kernels.cuda`), made once and kept: a step then
writes the grads' addresses into the tables (one small copy to the device per dtype) and
launches one kernel per dtype: `kernels.cuda.dense` for a group of one array,
`kernels.cuda.segments` (multi-tensor, a chunk table) for more, `kernels.cuda.blockwise`
for 8-bit state. The guard's sum of squares
and non-finite check run on the device too; only their verdict comes back (a host sync,
and only when `clip_global_norm` or `skip_nonfinite` asks for one). Launches go to the
default stream, or to `stream` (numba-cuda's, or `cuda.external_stream` of another
library's, such as torch's current stream).

Device arrays are anything with `__cuda_array_interface__` (numba-cuda's device arrays,
CuPy arrays, torch CUDA tensors), C-contiguous, of float32 or float64 (a float32 param's
grads may be float16: read as `fastrms.kernels.storage.FLOAT16`; a float32 param may have a
float16 copy written in the same pass, the copy being the user's param when the float32
array is its master); under numba-cuda's
simulator (`NUMBA_ENABLE_CUDASIM=1`), its fake device arrays. Imported only when such
params are given: importing fastrms never imports numba-cuda.
"""

import math

import numpy as np
from numba import cuda

from ..kernels import cuda as K
from ..kernels import storage
from ..kernels.segments import COPY, GRAD, PARAM

__all__ = ["Plan", "describe", "is_device_array"]

#: The non-finite check's flag before it looks.
_NO_FLAG = np.zeros(1, np.int32)
#: State arrays' columns in a pointer row, after param and grad.
_COLUMNS = {"square_avg": 2, "grad_avg": 3, "momentum_buffer": 4}


def is_device_array(a):
    """Whether `a` lives on a CUDA device (has `__cuda_array_interface__`, or is a fake
    device array of numba-cuda's simulator)."""
    return hasattr(type(a), "__cuda_array_interface__") or _simulated_array(a)


def _simulated_array(a):
    return K.SIMULATED and type(a).__name__ == "FakeCUDAArray"


def interface(a, name):
    """`(address, shape, dtype)` of device array `a`, C-contiguous (TypeError or ValueError
    naming `name` otherwise)."""
    if _simulated_array(a):
        face = a._ary.__array_interface__
    elif hasattr(type(a), "__cuda_array_interface__"):
        face = a.__cuda_array_interface__
    else:
        raise TypeError(f"{name} must be a CUDA device array (with __cuda_array_interface__), got {type(a).__name__}")
    dtype, shape = np.dtype(face["typestr"]), tuple(face["shape"])
    strides = face.get("strides")
    if strides is not None and tuple(strides) != _c_strides(shape, dtype.itemsize):
        raise ValueError(f"{name} must be C-contiguous, got strides {tuple(strides)} for shape {shape}")
    if face.get("mask") is not None:
        raise ValueError(f"{name} must not be masked")
    return int(face["data"][0]), shape, dtype


def _c_strides(shape, itemsize):
    out, step = [], itemsize
    for n in reversed(shape):
        out.append(step)
        step *= n
    return tuple(reversed(out))


class _Group:
    """The params of one dtype: their pointer rows (host and device), sizes and chunk
    table (device), the state arrays (device), and the kernel's launch shape."""

    def __init__(self, indices, addresses, sizes, dtype, spec, copies):
        self.indices, self.dtype, self.sizes = indices, np.dtype(dtype), sizes
        stored = self.stored = storage.state_dtype(spec.codec, self.dtype)
        held = [storage.extent(spec.codec, n) for n in sizes]  # 8-bit state: its blocks' bytes
        self.state = {name: [cuda.to_device(np.zeros(h, stored)) for h in held] for name in spec.names}
        self.held = np.array(held, np.int64)
        self.ptrs = np.zeros((len(indices), 6), np.int64)
        self.ptrs[:, PARAM] = addresses
        if copies is not None:
            self.ptrs[:, COPY] = copies
        for name, arrays in self.state.items():
            self.ptrs[:, _COLUMNS[name]] = [interface(a, name)[0] for a in arrays]
        self.total = int(sum(sizes))
        self.witness = cuda.device_array(0, self.dtype)
        self.chunks_host = K.chunk_table(np.array(sizes, np.int64), K.CHUNK)
        self.chunks = cuda.to_device(self.chunks_host)
        self.sizes_device = cuda.to_device(np.array(sizes, np.int64))
        self.ptrs_device = cuda.to_device(self.ptrs)
        self.blocks = max(1, min(len(self.chunks_host), 1024))
        self.partial = cuda.device_array(len(self.chunks_host), np.float64)  # the sum of squares per chunk
        self.grads = storage.NATIVE  # how the last step's grads are read (float16 for float32 params)

    def spans(self):
        """Byte spans `[start, end)` of every param, copy and state array the group writes."""
        size = np.array(self.sizes, np.int64)
        starts, ends = [], []
        widths = {PARAM: size * self.dtype.itemsize, COPY: size * 2}  # a copy: 16-bit
        for c in (PARAM, COPY, *(_COLUMNS[n] for n in self.state)):
            used = self.ptrs[:, c] != 0
            starts.append(self.ptrs[used, c])
            nbytes = widths.get(c, self.held * self.stored.itemsize)
            ends.append(self.ptrs[used, c] + nbytes[used])
        return np.concatenate(starts), np.concatenate(ends)


class Plan:
    """The dtype groups of an optimizer's device params, their state and tables; with
    `copies` (each param's 16-bit copy's address) and `copy` (their codec:
    `storage.ARRAYS` for `copy_to`'s copies, `storage.MASTERS` when the params are float32
    masters of 16-bit params), every launch writes each param's copy too."""

    def __init__(self, params, spec, stream=0, copies=None, copy=None):
        faces = [interface(p, f"params[{i}]") for i, p in enumerate(params)]  # float32 or float64: checked
        self.spec, self.stream, self.shapes = spec, stream, [shape for _, shape, _ in faces]
        self.copy = copy  # the copies' codec (`storage.ARRAYS` or `MASTERS`), with `copies` their addresses
        self.dtypes = [dtype for _, _, dtype in faces]
        order = list(dict.fromkeys(self.dtypes))
        self.groups = []
        for dtype in order:
            idx = [i for i, d in enumerate(self.dtypes) if d == dtype]
            addresses, sizes = [faces[i][0] for i in idx], [math.prod(faces[i][1]) for i in idx]
            copied = None if copies is None else [copies[i] for i in idx]
            self.groups.append(_Group(idx, addresses, sizes, dtype, spec, copied))
        self._totals = cuda.device_array(len(self.groups), np.float64)  # each group's sum of squares
        self._flag = cuda.to_device(_NO_FLAG)  # set by the non-finite check
        spans = [g.spans() for g in self.groups]
        self._starts = np.concatenate([s for s, _ in spans])
        self._ends = np.concatenate([e for _, e in spans])
        order = np.argsort(self._starts)
        self._starts, self._ends = self._starts[order], self._ends[order]
        if np.any(self._starts[1:] < self._ends[:-1]):
            raise ValueError(
                "params (or their copies) share memory on the device; fastrms steps them at once, so they must be "
                "separate"
            )

    def state(self, name, index):
        """The device array of state `name` of param `index`."""
        for group in self.groups:
            if index in group.indices:
                return group.state[name][group.indices.index(index)]
        raise IndexError(index)

    def check_grads(self, grads):
        """`(addresses, codecs)`: each grad's address and each group's grads codec, checked:
        a device array of its param's shape and dtype (or float16 for a float32 param, the
        group's grads all of one dtype), C-contiguous, sharing no memory with a param or the
        state (ValueError or TypeError naming the grad; nothing is written)."""
        addresses, dtypes = [], []
        for i, g in enumerate(grads):
            name = f"grads[{i}]" if len(grads) > 1 else "grads"
            address, shape, dtype = interface(g, name)
            if dtype != self.dtypes[i] and not (dtype == np.float16 and self.dtypes[i] == np.float32):
                also = " (or float16)" if self.dtypes[i] == np.float32 else ""
                raise TypeError(f"{name} must have dtype {self.dtypes[i]}{also} like its param, got {dtype}")
            if shape != self.shapes[i]:
                raise ValueError(f"{name} must have shape {self.shapes[i]} like its param, got {shape}")
            nbytes = math.prod(shape) * dtype.itemsize
            k = np.searchsorted(self._starts, address + nbytes, side="left") - 1
            if nbytes and k >= 0 and self._ends[k] > address:
                raise ValueError(f"{name} shares memory with a param or the optimizer's state")
            addresses.append(address)
            dtypes.append(dtype)
        codecs = []
        for group in self.groups:
            first = dtypes[group.indices[0]]
            for i in group.indices:
                if dtypes[i] != first:
                    raise TypeError(
                        f"grads[{i}] is {dtypes[i]}, grads[{group.indices[0]}] {first}: the grads of one dtype's "
                        f"params are all {group.dtype} or all float16"
                    )
            codecs.append(storage.NATIVE if first == group.dtype else storage.ARRAYS[first.name])
        return addresses, codecs

    def load(self, addresses, codecs):
        """Write the grads' `addresses` into each group's pointer table on the device, and
        keep how each group's grads are read (`codecs`, from `check_grads`)."""
        for group, codec in zip(self.groups, codecs):
            group.grads = codec
        for group in self.groups:
            column = [addresses[i] for i in group.indices]
            if not np.array_equal(group.ptrs[:, GRAD], column):
                group.ptrs[:, GRAD] = column
                group.ptrs_device.copy_to_device(group.ptrs, stream=self.stream)

    def sumsq(self):
        """The float64 sum of squares over every grad (a fixed order; one host sync)."""
        for g, group in enumerate(self.groups):
            K.sumsq(group.grads)[group.blocks, K.THREADS, self.stream](
                group.witness, group.ptrs_device, group.sizes_device, group.chunks, group.partial
            )
            K.total[1, 1, self.stream](group.partial, self._totals[g : g + 1])
        return float(sum(self._totals.copy_to_host(stream=self.stream)))  # the groups in order

    def nonfinite(self):
        """Whether any grad holds a NaN or an infinity (one host sync)."""
        self._flag.copy_to_device(_NO_FLAG, stream=self.stream)
        for group in self.groups:
            K.nonfinite(group.grads)[group.blocks, K.THREADS, self.stream](
                group.witness, group.ptrs_device, group.sizes_device, group.chunks, self._flag
            )
        return bool(self._flag.copy_to_host(stream=self.stream)[0])

    def run(self, scalars):
        """One launch per dtype group (no host sync)."""
        key, codec, copy, scalars = self.spec.variant, self.spec.codec, self.copy, tuple(scalars)
        for group in self.groups:
            if codec.block:  # 8-bit state: a block of threads per 8-bit block, over the chunk table
                K.blockwise(key, copy, group.grads)[group.blocks, K.THREADS, self.stream](
                    scalars, group.witness, group.ptrs_device, group.sizes_device, group.chunks
                )
            elif len(group.indices) == 1:
                blocks = max(1, min(-(-group.total // K.THREADS), 4096))
                K.dense(key, codec, copy, group.grads)[blocks, K.THREADS, self.stream](
                    scalars, group.witness, group.ptrs_device[0], group.total
                )
            else:
                K.segments(key, codec, copy, group.grads)[group.blocks, K.THREADS, self.stream](
                    scalars, group.witness, group.ptrs_device, group.sizes_device, group.chunks
                )

    @property
    def nbytes(self):
        """Bytes of state on the device."""
        return sum(a.nbytes for g in self.groups for arrays in g.state.values() for a in arrays)


def describe():
    """What fastrms sees of CUDA here: `{"available": bool, "device": str | None, "why": str}`
    (`fastrms info`)."""
    if K.SIMULATED:
        return {"available": True, "device": "numba-cuda simulator (NUMBA_ENABLE_CUDASIM=1)", "why": ""}
    try:
        if not cuda.is_available():
            return {"available": False, "device": None, "why": "no CUDA driver or GPU found by numba-cuda"}
        device = cuda.get_current_device()
        name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
        return {"available": True, "device": f"{name} (compute capability {device.compute_capability})", "why": ""}
    except Exception as exc:  # a driver that is there but cannot start
        return {"available": False, "device": None, "why": str(exc).strip().splitlines()[0] if str(exc) else repr(exc)}
