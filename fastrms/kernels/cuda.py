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
- `traffic(p, g, v)`: the bytes of a plain step with no arithmetic (`fastrms bench --cuda`'s
  limit).

- `blockwise(key, copy, grads)`: the multi-tensor kernel over 8-bit blockwise state
  (`.storage.BLOCKWISE8`), `(scalars, witness, ptrs, sizes, chunks)` as `segments`: a
  block of `THREADS` threads takes one 8-bit block (`BLOCK8` elements) at a time, a thread
  an element: each dequantises its element and steps it, the block's maxima of |v|, |m|
  and |b| are reduced in shared memory, and each thread requantises its element on them
  (the CPU's maps, codes and scales: `.blockwise`'s pieces).

`codec` (the state's storage) is `.storage.NATIVE` or `BFLOAT16` (8-bit blocks:
`blockwise`), `grads` native or a 16-bit grads codec, `copy` None or a copy codec
(`.storage.ARRAYS`, `MASTERS`): the CPU codecs, the same functions.

NVVM contracts `a * b + c` into one fused multiply-add, which the CPU kernels do not: the
device's results agree with the CPU's to rounding (a few ulps), not bit for bit. Under the
simulator (`NUMBA_ENABLE_CUDASIM=1`) the kernels run as Python on the host, each address
read as a NumPy view of host memory: for logic, at small sizes.
"""

import ctypes

import numpy as np
from numba import cuda
from numba.cuda.core import config

from .blockwise import code_of, magnitude, scale_of, scaling, store_scale
from .element import apply, constants, element
from .segments import COPY, GRAD, GRAD_AVG, MOMENTUM_BUFFER, PARAM, SQUARE_AVG, chunk_table
from .storage import BLOCK8, BLOCK8_BYTES, BLOCKWISE8, NATIVE, SIGNED8, UNSIGNED8

__all__ = [
    "CHUNK",
    "THREADS",
    "SIMULATED",
    "blockwise",
    "chunk_table",
    "dense",
    "nonfinite",
    "ptx",
    "segments",
    "sumsq",
    "total",
    "traffic",
]

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
        raise ValueError(f"the {codec.tag} state is kept in 8-bit blocks: blockwise() steps it, a block at a time")


def blockwise(key, copy=None, grads=NATIVE):
    """The multi-tensor kernel of variant `key` over 8-bit blockwise state (see the module);
    launched with `THREADS` threads a block, one per element of an 8-bit block."""
    if THREADS != BLOCK8:
        raise ValueError(f"blockwise needs a thread per element of a block: THREADS ({THREADS}) == BLOCK8 ({BLOCK8})")
    return _cached("blockwise", _make_blockwise, key, copy, grads)


def _make_blockwise(key, copy, grads):
    update, read = element(key), grads.load
    uses_m, uses_b, has_copy = key.uses_grad_avg, key.uses_momentum_buffer, copy is not None
    low = copy if has_copy else NATIVE
    encode, load, reseed = low.encode, low.load, low.reseed
    unsigned, signed = UNSIGNED8, SIGNED8
    views = _views(key, BLOCKWISE8, copy, grads)

    def kernel(scalars, witness, ptrs, sizes, chunks):
        k = constants(np.float32, scalars)
        zero = k[11]
        t = cuda.threadIdx.x
        tops = cuda.shared.array((3, THREADS), np.uint32)  # each thread's |v|, |m|, |b| bits, then their maxima
        for c in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
            a, start, stop = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            param, grad, square_avg, grad_avg, momentum_buffer, copy_out = views(witness, ptrs[a], sizes[a])
            for base in range(start, stop, BLOCK8):  # chunks start on a block: CHUNK is a multiple of BLOCK8
                at, i = (base // BLOCK8) * BLOCK8_BYTES, base + t
                live = i < stop
                v = m = b = zero
                if live:  # the thread's element, from the block's codes and scales
                    p = param[i]
                    if reseed:  # a 16-bit param written since the last step: its value is the master's now
                        p = load(copy_out, i) if copy_out[i] != encode(p) else p
                    if uses_m:
                        m = signed[grad_avg[at + t]] * scale_of(grad_avg, at)
                    if uses_b:
                        b = signed[momentum_buffer[at + t]] * scale_of(momentum_buffer, at)
                    p, v, m, b = update(p, read(grad, i), unsigned[square_avg[at + t]] * scale_of(square_avg, at), m,
                                        b, k)  # fmt: skip
                    param[i] = p
                    if has_copy:
                        copy_out[i] = encode(p)
                tops[0, t] = magnitude(v) if live else np.uint32(0)
                tops[1, t] = magnitude(m) if live else np.uint32(0)
                tops[2, t] = magnitude(b) if live else np.uint32(0)
                cuda.syncthreads()  # every code and scale of the block read, every magnitude written
                half = THREADS // 2
                while half > 0:
                    if t < half:
                        for r in range(3):
                            tops[r, t] = max(tops[r, t], tops[r, t + half])
                    cuda.syncthreads()
                    half //= 2
                if live:
                    pre, inv = scaling(tops[0, 0])
                    square_avg[at + t] = code_of(v, pre, inv, False)
                    if uses_m:
                        pre, inv = scaling(tops[1, 0])
                        grad_avg[at + t] = code_of(m, pre, inv, True)
                    if uses_b:
                        pre, inv = scaling(tops[2, 0])
                        momentum_buffer[at + t] = code_of(b, pre, inv, True)
                if t == 0:
                    store_scale(square_avg, at, tops[0, 0])
                    if uses_m:
                        store_scale(grad_avg, at, tops[1, 0])
                    if uses_b:
                        store_scale(momentum_buffer, at, tops[2, 0])
                cuda.syncthreads()  # the maxima read before the next block writes them

    return cuda.jit(kernel)


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
    """`views(witness, row, n)`: the six arrays of pointer row `row` holding `n` elements
    (each state array the storage elements that hold them: `codec.extent(n)`)."""
    uses_m, uses_b, has_copy = key.uses_grad_avg, key.uses_momentum_buffer, copy is not None
    stored, given, extent = codec.witness, grads.witness, codec.extent
    copied = copy.witness if has_copy else NATIVE.witness

    def views(witness, row, n):
        witness = host(witness)
        state = stored(witness)
        held = extent(n)
        return (
            view(row[PARAM], n, witness),
            view(row[GRAD], n, given(witness)),
            view(row[SQUARE_AVG], held, state),
            view(row[GRAD_AVG], held if uses_m else 0, state),
            view(row[MOMENTUM_BUFFER], held if uses_b else 0, state),
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


@cuda.jit
def traffic(p, g, v):
    """The same-traffic kernel of `fastrms bench --cuda`: reads `p`, `g` and `v` and writes
    `p` and `v`, as a plain step does, with no arithmetic but an addition (a grid-stride
    loop, as `dense`)."""
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        x, y = g[i], v[i]
        p[i] = p[i] + y
        v[i] = x
