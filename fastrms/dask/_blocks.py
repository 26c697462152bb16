"""The worker side of `fastrms.dask`: what one task does to one chunk.

Each chunk's step is the fused out-of-place kernel (`fastrms.functional.rmsprop_step`) into
a buffer of this process's pool (`_output`): a generation's chunk stacks the param and its
state, `(1 + k, *block)`, so a step is one task per chunk. On a cluster the task reads the
chunk by key from the worker's memory (`_pulled_step`), and with donation writes the new
chunk over the old one when nothing else can see it (`_sole_holder`).
"""

import contextlib
import functools
import os
import sys
import threading

import numba
import numpy as np

from .. import functional


def _output(shape, dtype):
    """An uninitialised `shape`/`dtype` array for a task's result, in an idle buffer of this
    process when one of the size is free, else a new one.

    A chunk step writes about as many bytes as it reads; into fresh memory each page also
    faults and is zeroed by the kernel, which more than doubled the step (1e7 float32: 12 ms
    against 5.3 ms into reused memory, one thread). The buffers returned are views of owner
    arrays kept here; an owner is idle when nothing but this list refers to it, that is when
    Dask has released every result and view made from it, so a buffer still held anywhere
    (a worker's data, a transfer, a user's array) is never handed out again. Idle buffers
    are kept up to the bytes in use (a step needs the previous generation's), the rest freed.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    with _BUFFERS_LOCK:
        idle = _idle()
        pick = next((i for i in idle if _BUFFERS[i].nbytes == nbytes), None)
        if pick is None:
            _BUFFERS.append(np.empty(max(nbytes, 1), np.uint8))
            pick = len(_BUFFERS) - 1
        else:
            idle.remove(pick)
        spare = sum(_BUFFERS[i].nbytes for i in idle)
        busy = sum(b.nbytes for b in _BUFFERS) - spare
        for i in sorted(idle, key=lambda i: (_BUFFERS[i].nbytes == nbytes, -i)):
            if spare <= busy:
                break
            spare -= _BUFFERS[i].nbytes
            _BUFFERS[i] = None
        buffer = _BUFFERS[pick]
        _BUFFERS[:] = [b for b in _BUFFERS if b is not None]
    return buffer[:nbytes].view(dtype).reshape(shape)


_BUFFERS: list = []
_BUFFERS_LOCK = threading.Lock()


def _idle():
    """Positions of the buffers nothing but `_BUFFERS` refers to (under the lock).
    `sys.getrefcount == 2`: the list's slot and the call's own argument."""
    return [i for i in range(len(_BUFFERS)) if sys.getrefcount(_BUFFERS[i]) == 2]


def release_buffers():
    """Free this process's idle task-output buffers (see `_output`); returns the bytes
    freed. After an optimizer is gone its workers keep up to two generations of them until
    the next task asks for one: `client.run(fastrms.dask.release_buffers)` frees them now."""
    with _BUFFERS_LOCK:
        idle = _idle()
        freed = sum(_BUFFERS[i].nbytes for i in idle)
        _BUFFERS[:] = [b for i, b in enumerate(_BUFFERS) if i not in set(idle)]
    return freed


@contextlib.contextmanager
def _task_threads():
    """Run a task's kernel on at most `OMP_NUM_THREADS` Numba threads when that is set.
    Dask's nanny sets it to 1 in its workers: a worker's parallelism is its task threads, and
    a parallel kernel in every one of them would oversubscribe the cores."""
    try:
        cap = int(os.environ.get("OMP_NUM_THREADS", "0"))
    except ValueError:
        cap = 0
    before = numba.get_num_threads()
    if 0 < cap < before:
        numba.set_num_threads(cap)  # this thread's own setting (Numba's docs)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def _kernel_step(param, grad, state, names, out, t, lr, beta, epsilon, options):
    """The fused out-of-place step of one block into the stacked `out` (param, then state
    in `names` order). Blocks may be views (a slice of a bigger array), broadcasts
    (zeros_like) or, sent between workers, unaligned buffers: the kernel reads aligned
    C-contiguous memory, so those are copied; computed blocks pass as they are."""
    param, grad = np.require(param, requirements="CA"), np.require(grad, requirements="CA")
    state = {name: np.require(a, requirements="CA") for name, a in zip(names, state)}
    with _task_threads():
        functional.rmsprop_step(
            param, grad, state, t, lr, beta, epsilon,
            out=(out[0], {name: out[1 + i] for i, name in enumerate(names)}), **options,
        )  # fmt: skip
    return out


def _block_step(param, grad, *state_and_args):
    """One chunk of `rmsprop_step`: the fused step into one stacked array `(1 + k,
    *block)` so the whole update is one task."""
    *state, names, t, lr, beta, epsilon, options = state_and_args
    out = _output((1 + len(names), *param.shape), param.dtype)
    return _kernel_step(param, grad, state, names, out, t, lr, beta, epsilon, options)


def _generation_step(stacked, grad, names, t, lr, beta, epsilon, options, out=None):
    """One chunk of `RMSprop`'s generation `(1 + k, *block)` (param, then state) and
    its grad block -> the next generation's chunk, in `out` (`stacked` itself to step in
    place) or else a pool buffer."""
    out = _output(stacked.shape, stacked.dtype) if out is None else out
    return _kernel_step(stacked[0], grad, list(stacked[1:]), names, out, t, lr, beta, epsilon, options)


class _Key:
    """A key passed to a task as a plain value, so the scheduler does not make it a dependency."""

    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key

    def __reduce__(self):
        return _Key, (self.key,)


class _Missing(KeyError):
    """A chunk the scheduler placed on this worker is not in its memory (Dask's memory manager
    dropped this replica since): the client redoes that chunk with dependencies."""


def _pulled_step(stacked, grad, names, t, lr, beta, epsilon, options, donate=False):
    """`_generation_step` on a worker holding both the generation's chunk and the
    grad's, read from its memory by key: the new chunk does not depend on the old one, so
    no lineage builds up across steps. With `donate`, the next generation is written over
    the old chunk when nothing but the worker's memory can see it (`_sole_holder`)."""
    from distributed import get_worker

    worker = get_worker()
    try:
        block, grad = worker.data[stacked.key], worker.data[grad.key]
    except KeyError as exc:
        raise _Missing(*exc.args) from None
    out = None
    if donate:
        refs = _refs(block)  # on its own line: as an argument of the call below, the stack would hold block too
        out = block if _sole_holder(worker, stacked.key, block, grad, refs) else None
    return _generation_step(block, grad, names, t, lr, beta, epsilon, options, out)


def _refs(block):
    """References to `block` and to the buffer it is a view of, as counted from the
    caller's frame (its local `block` included)."""
    return sys.getrefcount(block), sys.getrefcount(block.base)


@functools.cache
def _sole_refs():
    """`_refs` of a chunk that only a dict (the worker's memory) and the caller's local
    refer to, a view of a buffer only a list (the pool) and the chunk refer to: measured here
    once, in the same shape of call, rather than assumed (the counts differ between Python
    versions)."""
    pool = [np.empty(8, np.uint8)]
    data = {"chunk": pool[0].view(np.float32)}
    block = data["chunk"]
    return _refs(block)


#: A dependent task in one of these states no longer reads the chunk it depends on.
_SETTLED = frozenset({"memory", "released", "forgotten", "error"})


def _sole_holder(worker, key, block, grad, refs):
    """Whether the generation's chunk `block` (held under `key`; `refs` its
    `_refs` from the caller) may be written over by the step: it is a buffer of this
    process's pool (`_output`), C-contiguous and writeable, not the grad's memory;
    nothing but the worker's memory refers to it or to its buffer (no view of it is held,
    no transfer is sending it, no other key names it); and no task of this worker still
    waits to read it."""
    base = block.base
    if base is None or not (block.flags.c_contiguous and block.flags.writeable) or np.may_share_memory(block, grad):
        return False
    ts = worker.state.tasks.get(key)
    if ts is None or any(d.state not in _SETTLED for d in ts.dependents):
        return False
    with _BUFFERS_LOCK:
        return any(b is base for b in _BUFFERS) and refs == _sole_refs()


def _row(blocks, i):
    """Row `i` of a stacked block (given as the one-block list of `blockwise` without
    concatenation), a view: dask's own getitem copies a slice under half its array, and
    `map_blocks` dropping the stacked axis would concatenate, a copy too."""
    (stacked,) = blocks
    return stacked[i]


def _stack(param, *state):
    out = _output((1 + len(state), *param.shape), param.dtype)
    for i, a in enumerate((param, *state)):
        out[i] = a
    return out
