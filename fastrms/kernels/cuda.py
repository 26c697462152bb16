"""The CUDA kernels: the element function of `.element` (the same Python code the CPU shells
compile) compiled for the device by numba-cuda. Imported only on demand (`fastrms.backend.cuda`):
numba-cuda is optional (`pip install "fastrms[cuda]"`) and importing fastrms never imports it.

Every kernel takes its arrays by address, as the CPU chunk-table shell (`.segments`) does:
`ptrs` holds rows of six int64 addresses (param, grad, square_avg, grad_avg,
momentum_buffer, and a copy: `.segments.PARAM` ... `COPY`, 0 where nothing is kept), and
`witness` is an empty device array of the dtype the update computes in.

- `dense(key, codec, copy, grads)`: one array, `(scalars, witness, ptrs, n)` over its
  pointer row `ptrs` (1-D), a grid-stride loop (any grid covers any size);
- `segments(key, codec, copy, grads)`: many arrays of one dtype in one launch (apex's
  `multi_tensor_apply`), `(scalars, witness, ptrs, sizes, chunks)` over a chunk table
  (`chunk_table(sizes, CHUNK)`): block `b` takes chunks `b, b + grid, ...`, its threads
  stride the chunk's elements;
- `sumsq(grads)`: `(witness, ptrs, sizes, chunks, partial)`, each chunk's sum of squares
  of its grads in float64 into `partial[c]`, in a fixed order (each thread's strided
  elements in order, then a tree over the block's `THREADS` threads), and `total(partial,
  out)` sums the partials in order: the same bits at every launch of one table, on any
  device (not the CPU's bits: another order);
- `nonfinite(grads)`: `(witness, ptrs, sizes, chunks, flag)` sets `flag[0] = 1` when any
  grad holds a NaN or an infinity.

`codec` (the state's storage) is `.storage.NATIVE` or `BFLOAT16`, `grads` native or a
16-bit grads codec, `copy` None or a copy codec (`.storage.ARRAYS`, `MASTERS`): the CPU
codecs, the same functions. 8-bit blocks (`BLOCKWISE8`) are CPU-only: each block's scale
needs the block's maximum first, a reduction per block this module does not have.

NVVM contracts `a * b + c` into one fused multiply-add, which the CPU kernels do not: the
device's results agree with the CPU's to rounding (a few ulps), not bit for bit. Under the
simulator (`NUMBA_ENABLE_CUDASIM=1`) the kernels run as Python on the host, each address
read as a NumPy view of host memory: for logic, at small sizes.
"""

import ctypes

import numpy as np
from numba import cuda
from numba.cuda.core import config

from .element import apply, constants
from .segments import COPY, GRAD, GRAD_AVG, MOMENTUM_BUFFER, PARAM, SQUARE_AVG, chunk_table
from .storage import NATIVE

__all__ = ["CHUNK", "THREADS", "SIMULATED", "chunk_table", "dense", "nonfinite", "ptx", "segments", "sumsq", "total"]

#: Elements a chunk of the multi-tensor kernel holds (torch's `MultiTensorApply` packs 65536).
CHUNK = 1 << 16
#: Threads per block of every kernel (a power of two: the sum's tree halves it).
THREADS = 256
#: Whether the kernels run on numba-cuda's simulator (`NUMBA_ENABLE_CUDASIM=1`).
SIMULATED = bool(config.ENABLE_CUDASIM)

if SIMULATED:

    def view(address, n, witness):
        """The `n` elements of `witness`'s dtype at `address`: host memory under the simulator."""
        if n == 0 or address == 0:
            return np.empty(0, witness.dtype)
        buffer = (ctypes.c_char * (int(n) * witness.dtype.itemsize)).from_address(int(address))
        return np.frombuffer(buffer, dtype=witness.dtype, count=int(n))

    def host(witness):
        """An empty host array of `witness`'s dtype (the codecs' witnesses are CPU functions)."""
        return np.empty(0, witness.dtype)

else:
    from numba.cuda import types
    from numba.cuda.extending import intrinsic
    from numba.cuda.np.arrayobj import np_cfarray
    from numba.cuda.typing import signature

    @intrinsic
    def view(typingctx, address, n, witness):
        """The `n` elements of `witness`'s dtype at device `address`, as a C-contiguous 1-D
        array (an intrinsic: no device function call, which numba-cuda would compile for
        the current device, and a machine without one has none)."""
        if not isinstance(witness, types.Array) or not isinstance(address, types.Integer):
            return None
        pointer = types.CPointer(witness.dtype)
        made = types.Array(witness.dtype, 1, "C")

        def codegen(context, builder, sig, args):
            ptr = builder.inttoptr(args[0], context.get_value_type(pointer))
            return np_cfarray(context, builder, signature(made, pointer, types.intp), (ptr, args[1]))

        return made(address, n, witness), codegen

    @intrinsic
    def host(typingctx, witness):
        """`witness` itself (under the simulator, an empty host array of its dtype)."""
        if not isinstance(witness, types.Array):
            return None
        return witness(witness), lambda context, builder, sig, args: args[0]


_KERNELS: dict = {}


def _cached(kind, make, *key):
    tag = (kind, *key)
    found = _KERNELS.get(tag)
    if found is None:
        found = _KERNELS[tag] = make(*key)
    return found


def dense(key, codec=NATIVE, copy=None, grads=NATIVE):
    """The grid-stride kernel of variant `key` over one array (see the module)."""
    _elementwise(codec)
    return _cached("dense", _make_dense, key, codec, copy, grads)


def segments(key, codec=NATIVE, copy=None, grads=NATIVE):
    """The multi-tensor kernel of variant `key` over a chunk table (see the module)."""
    _elementwise(codec)
    return _cached("segments", _make_segments, key, codec, copy, grads)


def _elementwise(codec):
    if codec.block:
        raise ValueError(f"the {codec.tag} state is kept in 8-bit blocks, which the CUDA kernels do not step")


def _updater(key, codec, copy, grads):
    """The inlined step of element `i` of one array's views, the update's values read and
    stored as the codecs say; with `copy`, the param's copy written too (a param written
    from outside since the last step takes its copy's value first: `copy.reseed`)."""
    at, read = apply(key, codec), grads.load
    uses_m, uses_b = key.uses_grad_avg, key.uses_momentum_buffer
    has_copy = copy is not None
    encode = copy.encode if has_copy else NATIVE.encode
    load = copy.load if has_copy else NATIVE.load
    reseed = has_copy and copy.reseed

    def step(i, param, grad, square_avg, grad_avg, momentum_buffer, copy_out, k):
        p = param[i]
        if reseed:
            p = load(copy_out, i) if copy_out[i] != encode(p) else p
        p, v, m, b = at(i, p, read(grad, i), square_avg, grad_avg, momentum_buffer, k)
        param[i] = p
        if has_copy:
            copy_out[i] = encode(p)
        square_avg[i] = v
        if uses_m:
            grad_avg[i] = m
        if uses_b:
            momentum_buffer[i] = b

    return cuda.jit(device=True, inline="always")(step) if not SIMULATED else step


def _views(key, codec, copy, grads):
    """`views(witness, row, n)`: the six arrays of pointer row `row` holding `n` elements."""
    uses_m, uses_b, has_copy = key.uses_grad_avg, key.uses_momentum_buffer, copy is not None
    stored, given = codec.witness, grads.witness
    copied = copy.witness if has_copy else NATIVE.witness

    def views(witness, row, n):
        witness = host(witness)
        state = stored(witness)
        return (
            view(row[PARAM], n, witness),
            view(row[GRAD], n, given(witness)),
            view(row[SQUARE_AVG], n, state),
            view(row[GRAD_AVG], n if uses_m else 0, state),
            view(row[MOMENTUM_BUFFER], n if uses_b else 0, state),
            view(row[COPY], n if has_copy else 0, copied(witness)),
        )

    return cuda.jit(device=True, inline="always")(views) if not SIMULATED else views


def _make_dense(key, codec, copy, grads):
    step, views = _updater(key, codec, copy, grads), _views(key, codec, copy, grads)

    def kernel(scalars, witness, ptrs, n):
        k = constants(witness.dtype.type, scalars)
        param, grad, square_avg, grad_avg, momentum_buffer, copy_out = views(witness, ptrs, n)
        for i in range(cuda.grid(1), n, cuda.gridsize(1)):
            step(i, param, grad, square_avg, grad_avg, momentum_buffer, copy_out, k)

    return cuda.jit(kernel)


def _make_segments(key, codec, copy, grads):
    step, views = _updater(key, codec, copy, grads), _views(key, codec, copy, grads)

    def kernel(scalars, witness, ptrs, sizes, chunks):
        k = constants(witness.dtype.type, scalars)
        for c in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
            a, start, stop = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            param, grad, square_avg, grad_avg, momentum_buffer, copy_out = views(witness, ptrs[a], sizes[a])
            for i in range(start + cuda.threadIdx.x, stop, cuda.blockDim.x):
                step(i, param, grad, square_avg, grad_avg, momentum_buffer, copy_out, k)

    return cuda.jit(kernel)


def sumsq(grads=NATIVE):
    """Each chunk's sum of squares of its grads, read as `grads` says (see the module)."""
    return _cached("sumsq", _make_sumsq, grads)


def _make_sumsq(grads):
    read, given = grads.load, grads.witness

    def kernel(witness, ptrs, sizes, chunks, partial):
        lanes = cuda.shared.array(THREADS, np.float64)
        t = cuda.threadIdx.x
        for c in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
            a, start, stop = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            grad = view(ptrs[a, GRAD], sizes[a], given(host(witness)))
            acc = 0.0
            for i in range(start + t, stop, THREADS):
                x = np.float64(read(grad, i))
                acc += x * x
            lanes[t] = acc
            cuda.syncthreads()
            half = THREADS // 2
            while half > 0:
                if t < half:
                    lanes[t] += lanes[t + half]
                cuda.syncthreads()
                half //= 2
            if t == 0:
                partial[c] = lanes[0]
            cuda.syncthreads()

    return cuda.jit(kernel)


@cuda.jit
def total(partial, out):
    """`out[0] = sum(partial)` in order (one thread)."""
    if cuda.grid(1) == 0:
        acc = 0.0
        for c in range(partial.shape[0]):
            acc += partial[c]
        out[0] = acc


def nonfinite(grads=NATIVE):
    """Whether any grad of a table is NaN or infinite, into `flag[0]` (see the module)."""
    return _cached("nonfinite", _make_nonfinite, grads)


def _make_nonfinite(grads):
    read, given = grads.load, grads.witness

    def kernel(witness, ptrs, sizes, chunks, flag):
        for c in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
            a, start, stop = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            grad = view(ptrs[a, GRAD], sizes[a], given(host(witness)))
            for i in range(start + cuda.threadIdx.x, stop, cuda.blockDim.x):
                x = read(grad, i)
                if x - x != x - x:  # NaN for a NaN or an infinity, 0 otherwise
                    flag[0] = 1

    return cuda.jit(kernel)


class _Device:
    """What numba-cuda asks of the current device while it compiles: its compute capability."""

    def __init__(self, cc):
        self.compute_capability = tuple(cc)


def ptx(kernel, signature, cc):
    """`(ptx, resty)`: `kernel` (one of this module's) compiled to PTX for compute capability
    `cc` (`(8, 0)`, `(9, 0)`), with or without a GPU. numba-cuda compiles an overload's
    device function (a scalar's `.view`, which the 16-bit codecs use) for the current
    device even when `cc` is given; on a machine without one that query fails, so while
    this compiles it is answered with `cc` (numba-cuda has no setting for it)."""
    from numba.cuda import dispatcher

    asked = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: _Device(cc)
    try:
        return cuda.compile_ptx(getattr(kernel, "py_func", kernel), signature, cc=tuple(cc))
    finally:
        dispatcher.get_current_device = asked
