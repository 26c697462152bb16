"""The fused RMSprop step over Dask arrays: one task per chunk, each running the out-of-place
kernel (`fastrms.functional.rmsprop_step`) on its block, for params and state that
live on a `distributed` cluster. `docs/algorithm.md` is the update; the bits are those of
`fastrms.RMSprop` on the same data, whatever the chunking.

- `rmsprop_step`: the lazy pure step, `(param, grad, state, t, lr, ...) -> (new_param,
  new_state)`; nothing is computed until you ask.
- `RMSprop`: the optimizer-shaped wrapper: params and state held as persisted dask
  arrays, `step(grads)` builds the next generation, persists it and waits for it (errors
  surface there); `save`/`load` write and read the state as a Zarr store.

Importing `fastrms` never imports dask; importing `fastrms.dask` without it raises one
ImportError saying what to install.
"""

try:
    import dask
    import dask.array as da
except ImportError:  # pragma: no cover - exercised in a subprocess without dask
    raise ImportError(
        "fastrms.dask needs Dask; install it with: pip install 'fastrms[dask]' (dask[array], distributed, zarr)"
    ) from None

import contextlib
import functools
import os
import secrets
import shutil
import stat
import sys
import threading
import zlib
from typing import TYPE_CHECKING, NamedTuple

import numba
import numpy as np

from . import checkpoint, functional
from . import options as O
from ._checks import STEP_MAX, count
from .clock import Clock
from .presets import preset_options

if TYPE_CHECKING:  # the static types of **options (generated from the options table)
    from typing_extensions import Unpack

    from ._typing import Options

__all__ = ["LostStateError", "RMSprop", "init_state", "release_buffers", "rmsprop_step"]

#: The small file in a checkpoint folder that names the current generation.
POINTER = "CURRENT"


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


def _check_array(label, a, like=None):
    if not isinstance(a, da.Array):
        raise TypeError(f"{label} must be a dask.array.Array, got {type(a).__name__}")
    if a.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"{label} must have dtype float32 or float64, got {a.dtype}")
    if any(np.isnan(c) for dim in a.chunks for c in dim):
        raise ValueError(
            f"{label} has chunks of unknown size (shape {a.shape}); call {label}.compute_chunk_sizes() first"
        )
    if like is not None:
        if a.dtype != like.dtype or a.shape != like.shape:
            raise ValueError(f"{label} must be {like.dtype} of shape {like.shape} like param, got {a.dtype} {a.shape}")
        if a.chunks != like.chunks:
            raise ValueError(
                f"{label} must be chunked like param ({like.chunks}), got {a.chunks}; rechunk it first "
                "(x.rechunk(param.chunks))"
            )
    return a


def _hyperparameters(learning_rate, beta, epsilon, options, dtype):
    if callable(learning_rate):
        raise TypeError("learning_rate must be a number here; evaluate the schedule at t - 1 and pass its value")
    if options.get("clip_global_norm") is not None:
        raise ValueError(
            "clip_global_norm is not supported over dask arrays (the norm would need a pass over every chunk "
            "before the step); clip_value is"
        )
    return functional._hyperparameters(learning_rate, {**options, "beta": beta, "epsilon": epsilon}, dtype)


def init_state(param, **options):
    """The variant's initial state for the dask array `param` (chunked like it)."""
    _check_array("param", param)
    hyper = O.resolve(options, "init_state()")
    state = {name: da.zeros_like(param) for name in O.state_names(hyper)}
    scale = O.BY_NAME["initial_scale"].check(hyper["initial_scale"])
    if scale:
        state["square_avg"] = da.full_like(param, scale)
    return state


def rmsprop_step(
    param, grad, state, t, learning_rate, beta=0.9, epsilon=1e-8,
    **options: "Unpack[Options]",
):  # fmt: skip
    """Step `t` (1-based) of RMSprop over dask arrays, lazily: returns `(new_param,
    new_state)`, dask arrays chunked like `param`. `state` is a dict of dask arrays named
    as in `fastrms.functional.rmsprop_step` (`square_avg`, `grad_avg`,
    `momentum_buffer` as the variant keeps them), or None for the initial state.

    The graph is one task per chunk (a `map_blocks` over param, grad and state), each
    running the fused out-of-place kernel on its block; input blocks are never written.
    `learning_rate` is a number (evaluate a schedule on the client). Grads and state must be
    chunked like `param` (a clear error says so otherwise). `clip_global_norm` is refused
    (it needs every chunk before the step); `skip_nonfinite` acts per block here (use
    `RMSprop` for a global skip).
    """
    _check_array("param", param)
    _check_array("grad", grad, param)
    t = count("t", t, minimum=1, maximum=STEP_MAX)
    hyper = _hyperparameters(learning_rate, beta, epsilon, options, param.dtype)
    names = O.state_names(hyper)
    if state is None:
        state = init_state(param, **{k: hyper[k] for k in O.NAMES if k != "learning_rate"})
    if not isinstance(state, dict) or set(state) != set(names):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"state must be a dict of exactly {sorted(names)} for this variant, got {got}")
    arrays = [_check_array(f"state[{name!r}]", state[name], param) for name in names]
    kernel_options = {k: hyper[k] for k in O.NAMES if k not in ("learning_rate", "beta", "epsilon")}
    stacked = da.map_blocks(
        _block_step, param, grad, *arrays,
        names, t, hyper["learning_rate"], hyper["beta"], hyper["epsilon"], kernel_options,
        new_axis=0, chunks=((1 + len(names),), *param.chunks), dtype=param.dtype,
        name=f"fastrms-step-{dask.base.tokenize(param, grad, *arrays, names, t, hyper)}",
    )  # fmt: skip
    new_param, *new_state = _unstack(stacked)
    return new_param, dict(zip(names, new_state))


def _unstack(stacked):
    """The arrays stacked along axis 0 of `stacked`, each chunk a view of the stacked chunk."""
    return [_layer(stacked, i) for i in range(stacked.shape[0])]


def _layer(stacked, i):
    """Array `i` stacked along axis 0 of `stacked`, each chunk a view of the stacked chunk."""
    idx = _indices(stacked.ndim - 1)
    return da.blockwise(
        _row, idx, stacked, (0, *idx), i, None, concatenate=False, dtype=stacked.dtype,
        name=f"fastrms-row{i}-{stacked.name}",
    )  # fmt: skip


class _Shape(NamedTuple):
    """What `_check_array` compares against: a generation's param without building it."""

    dtype: np.dtype
    shape: tuple
    chunks: tuple

    @classmethod
    def of(cls, stacked):
        return cls(stacked.dtype, stacked.shape[1:], stacked.chunks[1:])


def _client():
    """The active `distributed.Client`, or None (then dask's local schedulers run)."""
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def _take(key):
    """On the worker holding `key`: its data, under the new task's own key (no copy)."""
    from distributed import get_worker

    return get_worker().data[key]


def _block_crc32(block):
    out = np.empty((1,) * block.ndim, np.int64)
    out.flat[0] = zlib.crc32(np.ascontiguousarray(block).tobytes())
    return out


def _checksums(a):
    """The CRC-32 of each chunk of `a` (its bytes in C order), as a dask array with one
    element per chunk."""
    return da.map_blocks(_block_crc32, a, chunks=tuple((1,) * len(c) for c in a.chunks), dtype=np.int64)


class LostStateError(RuntimeError):
    """Chunks of the params or state were lost with a worker (they have no lineage to be
    recomputed from): resume from the last checkpoint."""


def _wait(client, futures, watch, errors=True):
    """Wait for `futures`; every second, check that every chunk of `watch` (the data the
    work reads) still has a worker holding it, and raise LostStateError if one has none
    (a restricted re-run could otherwise wait forever for a dead worker). With `errors`,
    a failed future raises its error."""
    from distributed import futures_of, wait

    watched = futures_of(watch)
    while True:
        try:
            wait(futures, timeout=1.0)
            break
        except TimeoutError:
            who = client.who_has(watched)
            lost = [k for k, holders in who.items() if not holders]
            if lost:
                raise LostStateError(f"{len(lost)} chunk(s) of the optimizer's data were lost with a worker") from None
    for f in futures if errors else ():
        if f.status != "finished":
            f.result()


def _rekey(client, futures, ids, name):
    """Computed `futures` under the keys `(f"{name}-{i}", *index)` for each `(i, *index)`
    of `ids`, by tasks without dependencies that run where the data already is: the
    scheduler can then forget the lineage (the price: a chunk lost with its worker cannot be
    recomputed; the next step raises and the run resumes from a checkpoint)."""
    who = client.who_has(futures)
    return {
        at: client.submit(
            _take,
            f.key,
            key=(f"{name}-{at[0]}", *at[1:]),
            workers=list(who[f.key]),
            allow_other_workers=False,
            pure=False,
        )  # fmt: skip
        for f, at in zip(futures, ids)
    }


def _array(graph, like):
    """A dask array of the futures `graph` (key -> future), named and chunked like `like`."""
    return da.Array(graph, next(iter(graph))[0], like.chunks, dtype=like.dtype)


def _detach(client, arrays, watch):
    """Wait for the persisted `arrays` (errors of dead workers surface here), then re-key
    every chunk (`_rekey`) so the scheduler's task count stays flat."""
    from distributed import futures_of

    futures = futures_of(arrays)
    _wait(client, futures, watch)
    name, done = f"fastrms-gen-{secrets.token_hex(8)}", []
    for i, a in enumerate(arrays):
        keys = list(dask.core.flatten(a.__dask_keys__()))
        by_key = {f.key: f for f in futures_of(a)}
        done.append(_rekey(client, [by_key[k] for k in keys], [(i, *k[1:]) for k in keys], name))
    _wait(client, [f for graph in done for f in graph.values()], arrays)
    return [_array({f.key: f for f in graph.values()}, a) for graph, a in zip(done, arrays)]


def _indices(ndim):
    return tuple(range(1, ndim + 1))


class RMSprop:
    """RMSprop over dask arrays on a cluster: params and state held as persisted dask arrays.

    `RMSprop(params, learning_rate, beta, epsilon, **options)` takes a dask array or a
    sequence of them and `fastrms.RMSprop`'s options, presets (`like`) and
    validation (`clip_global_norm` excepted). Each param and its state are held as one
    persisted *generation*: a dask array `(1 + k, *param.shape)` chunked like the param
    (param, then the state), so a step is one task per chunk; `params` and
    `state` are views of it (each chunk a view of the generation's, no copy).

    `step(grads)` evaluates the schedule on the client and runs the fused step of every
    chunk. On a `distributed` cluster each chunk's task runs on the worker holding the
    chunk and reads it (and the grad's chunk, when the same worker holds it) from the
    worker's memory by key, so the new generation does not depend on the old one: the
    scheduler's task count stays flat over any number of steps, and its result lands in a
    buffer of an earlier, released generation (no fresh pages). A grad chunk held elsewhere
    is sent to the task by the scheduler and that result re-keyed without its lineage. A
    worker that dies takes its chunks with it: the next step raises `LostStateError`
    telling you to resume from the last checkpoint. With `skip_nonfinite` a step whose
    grads hold a NaN or an infinity (one reduction over the grads, computed first) changes
    nothing.

    `donate=True` (JAX's buffer donation, for the optimizer's own arrays): on a
    `distributed` cluster each chunk's step writes the new generation over the old one
    instead of into other memory, when nothing but the worker's memory can see the old chunk
    (no view of it held on the worker, no transfer sending it, no task there still to read
    it; otherwise that chunk goes out of place). The step then moves 5 streams of memory
    instead of 7 and needs no memory for a second generation: the same bits, faster, in
    half the memory (`client.run(fastrms.dask.release_buffers)` frees buffers left idle
    by earlier out-of-place steps). The price is Dask's immutability for the optimizer's
    arrays: dask arrays taken from `params` / `state` (or computed lazily from
    them) before a step and computed after it read the new values, so persist a copy of
    what you keep (`(opt.params + 0).persist()`) and let what you compute from them finish
    before the next step. If a donating step fails on the cluster, the old generation may be
    half overwritten: the optimizer then refuses any further use (`load` included: its
    params are part of that generation) with `LostStateError`; resume in a new one.
    Without a `distributed` client (Dask's local schedulers) the step stays out of place.
    """

    def __init__(self, params, learning_rate=0.001, beta=0.9,
                 epsilon=1e-8, *, donate=False, **options: "Unpack[Options]"):  # fmt: skip
        if not isinstance(donate, bool):
            raise TypeError(f"donate must be True or False, got {donate!r}")
        self._donate = donate
        self._broken = None
        self._single = isinstance(params, da.Array)
        given = [params] if self._single else list(params) if hasattr(params, "__iter__") else None
        if given is None or isinstance(params, (str, bytes, dict)):
            raise TypeError(f"params must be a dask array or a sequence of them, got {type(params).__name__}")
        arrays = [_check_array("params" if self._single else f"params[{i}]", p) for i, p in enumerate(given)]
        hyper = O.resolve({**options, "learning_rate": learning_rate, "beta": beta, "epsilon": epsilon})
        if hyper["clip_global_norm"] is not None:
            _hyperparameters(0.0, beta, epsilon, {"clip_global_norm": hyper["clip_global_norm"]}, np.float64)
        self._hyper = O.check_hyperparameters(hyper, tuple(dict.fromkeys(a.dtype for a in arrays)))
        if self._hyper["dense_rows"]:
            raise ValueError("dense_rows=True is an option of step_rows, which fastrms.dask.RMSprop does not have")
        self._names = O.state_names(self._hyper)
        self._dtypes = tuple(dict.fromkeys(a.dtype for a in arrays))
        self._clock = Clock(self._hyper, self._dtypes)
        kernel = {k: self._hyper[k] for k in O.NAMES if k != "learning_rate"}
        self._gens = []
        self._gens = self._settle([self._stacked(p, init_state(p, **kernel)) for p in arrays])

    @classmethod
    def like(cls, name, params, *, donate=False, **overrides):
        """An optimizer with library `name`'s defaults and formula (see `fastrms.presets`)."""
        return cls(params, donate=donate, **preset_options(name, overrides))

    # ------------------------------------------------------------------ properties

    @property
    def params(self):
        """The current params: dask arrays (views of the persisted generation), in the
        structure given."""
        self._usable()
        self._present()
        params = [_layer(g, 0) for g in self._gens]
        return params[0] if self._single else params

    @property
    def state(self):
        """The state of each param: dicts of dask arrays (views of the persisted generation),
        PyTorch's names."""
        self._usable()
        self._present()
        states = [dict(zip(self._names, _unstack(g)[1:])) for g in self._gens]
        return states[0] if self._single else states

    @property
    def step_count(self):
        """Steps taken so far."""
        return self._clock.step_count

    @property
    def skipped_steps(self):
        """Steps refused by `skip_nonfinite`."""
        return self._clock.skipped_steps

    @property
    def current_learning_rate(self):
        """The learning rate the next step will use."""
        return self._clock.lr()

    @property
    def last_learning_rate(self):
        """The learning rate the last step used (None before the first step)."""
        return self._clock.last_lr

    @property
    def hyperparameters(self):
        return dict(self._hyper)

    @property
    def donate(self):
        """Whether steps write the new generation over the old one where they can (see the
        class docstring)."""
        return self._donate

    def _present(self):
        """Raise LostStateError when a chunk of the params or state has no worker holding it
        (they have no lineage: anything computed from them would wait forever)."""
        client = _client()
        if client is None:
            return
        from distributed import futures_of

        futures = futures_of(self._gens)
        if futures:
            lost = sum(not holders for holders in client.who_has(futures).values())
            if lost:
                raise LostStateError(
                    f"{lost} chunk(s) of the params or state were lost with a worker: resume from your last "
                    "checkpoint (RMSprop.load)"
                )

    def _usable(self):
        if self._broken is not None:
            raise LostStateError(
                f"a donating step failed ({self._broken}), so this optimizer's params and state may be half updated: "
                "resume from your last checkpoint in a new RMSprop over the params saved with it (RMSprop.load)"
            )

    # ------------------------------------------------------------------ generations

    def _stacked(self, param, state):
        """The lazy generation of `param` and its `state` dict."""
        idx = _indices(param.ndim)
        arrays = [param, *(state[name] for name in self._names)]
        return da.blockwise(
            _stack, (0, *idx), *(x for a in arrays for x in (a, idx)),
            new_axes={0: len(arrays)}, dtype=param.dtype,
            name=f"fastrms-stack-{dask.base.tokenize(*arrays)}",
        )  # fmt: skip

    def _settle(self, gens):
        """Persist new generations built from outside data (the initial params and state, a
        checkpoint) and wait for them, re-keyed without lineage on a cluster."""
        client = _client()
        if client is None:
            return list(dask.persist(*gens))
        try:
            return _detach(client, client.persist(gens, optimize_graph=False), self._gens)
        except Exception as exc:
            raise LostStateError(
                f"the optimizer's data could not be computed on the cluster ({type(exc).__name__}: {exc}); "
                "resume from your last checkpoint (RMSprop.load)"
            ) from exc

    # ------------------------------------------------------------------ the step

    def step(self, grads):
        """One step: `grads` (dask arrays chunked like the params, in their structure)."""
        self._usable()
        grads = [grads] if self._single else list(grads)
        if len(grads) != len(self._gens):
            raise ValueError(f"grads must hold {len(self._gens)} arrays, one per param, got {len(grads)}")
        for i, (g, gen) in enumerate(zip(grads, self._gens)):
            _check_array("grads" if self._single else f"grads[{i}]", g, _Shape.of(gen))
        client = _client()
        if client is not None:
            grads = self._computed(client, grads)
        if self._hyper["skip_nonfinite"]:
            finite = dask.compute(*(da.isfinite(g).all() for g in grads))
            if not all(finite):
                self._clock.skip()
                return
        lr = self._clock.lr()
        t = self._clock.step_count + 1
        options = {k: self._hyper[k] for k in O.NAMES if k not in ("learning_rate", "beta", "epsilon")}
        options["skip_nonfinite"] = False  # checked globally above
        args = dict(names=self._names, t=t, lr=float(lr), beta=self._hyper["beta"],
                    epsilon=self._hyper["epsilon"], options=options)  # fmt: skip
        if client is None:
            new = []
            for gen, g in zip(self._gens, grads):
                idx = _indices(g.ndim)
                new.append(da.blockwise(_generation_step, (0, *idx), gen, (0, *idx), g, idx, dtype=gen.dtype, **args))
            self._gens = list(dask.persist(*new))
        else:
            self._gens = self._cluster_step(client, grads, args)
        self._clock.advance_with(lr)

    def _computed(self, client, grads):
        """`grads` persisted on the cluster (as given when they already are) and computed."""
        from distributed import futures_of

        out = []
        for g in grads:
            keys = set(dask.core.flatten(g.__dask_keys__()))
            if {f.key for f in futures_of(g)} != keys:
                g = client.persist(g)
            out.append(g)
        _wait(client, futures_of(out), self._gens)
        return out

    def _cluster_step(self, client, grads, args):
        """Every chunk's step on the worker holding it (see the class docstring); one
        `client.map` per worker, one wait."""
        from distributed import futures_of

        def chunks(a):
            by_key = {f.key: f for f in futures_of(a)}
            return [by_key[k] for k in dask.core.flatten(a.__dask_keys__())]

        gens, grad_chunks = [chunks(g) for g in self._gens], [chunks(g) for g in grads]
        who = client.who_has([f for fs in (*gens, *grad_chunks) for f in fs])
        lost = sum(not who[f.key] for fs in gens for f in fs)
        if lost:
            raise LostStateError(
                f"{lost} chunk(s) of the params or state were lost with a worker (each step drops their lineage so "
                "the scheduler does not grow): resume from your last checkpoint (RMSprop.load)"
            )
        name = f"fastrms-gen-{secrets.token_hex(8)}"
        by_worker, redo = {}, []  # worker -> [(chunk id, chunk key, grad key, chunk, grad)]; [(id, chunk, grad)]
        for i, (gen, grad) in enumerate(zip(gens, grad_chunks)):
            for f, g in zip(gen, grad):
                both = [w for w in who[f.key] if w in set(who[g.key])]
                if both:
                    by_worker.setdefault(both[0], []).append(((i, *f.key[1:]), _Key(f.key), _Key(g.key), f, g))
                else:
                    redo.append(((i, *f.key[1:]), f, g))
        pulled = []
        for worker, tasks in by_worker.items():
            ids, stacked, grad, _, _ = zip(*tasks)
            fs = client.map(_pulled_step, stacked, grad, key=[(f"{name}-{i}", *at) for i, *at in ids],
                            workers=[worker], allow_other_workers=False, pure=False, donate=self._donate,
                            **args)  # fmt: skip
            pulled += zip(fs, tasks)
        watch = [*self._gens, *grads]
        try:
            _wait(client, [f for f, _ in pulled], watch, errors=False)
            done, missing = {}, False
            for f, (at, _, _, chunk, grad) in pulled:
                if f.status == "finished":
                    done[at] = f
                elif isinstance(f.exception(), _Missing):
                    redo.append((at, chunk, grad))
                    missing = True
                else:
                    f.result()
            if redo:
                # the grad's chunk is elsewhere (or a replica the scheduler named was dropped):
                # the scheduler brings the data together; the results are re-keyed without
                # that dependency, and if a failed task holds its key, the whole generation
                # takes a new name
                ids, chunks, grads_ = zip(*redo)
                moved = client.map(_generation_step, chunks, grads_, key=[(f"moved-{name}-{i}", *at) for i, *at in ids],
                                   pure=False, **args)  # fmt: skip
                _wait(client, moved, watch)
                done.update(zip(ids, moved))
                final = f"fastrms-gen-{secrets.token_hex(8)}" if missing else name
                again = [(at, f) for at, f in done.items() if f.key != (f"{final}-{at[0]}", *at[1:])]
                done.update(_rekey(client, [f for _, f in again], [at for at, _ in again], final))
                _wait(client, list(done.values()), watch)
        except LostStateError as exc:
            if self._donate:
                self._broken = str(exc)
            raise
        except Exception as exc:
            if self._donate:
                self._broken = f"{type(exc).__name__}: {exc}"
            raise LostStateError(
                f"the step failed on the cluster ({type(exc).__name__}: {exc}); params and state of this step may "
                "be lost: resume from your last checkpoint (RMSprop.load)"
            ) from exc
        return [_array({f.key: f for at, f in done.items() if at[0] == i}, gen) for i, gen in enumerate(self._gens)]

    # ------------------------------------------------------------------ checkpoints (Zarr)

    def save(self, path):
        """Write the state (not the params), step counts, hyperparameters and a format version
        as a Zarr store in a new folder under `path`, written in parallel by the workers
        (chunked like the arrays), then point `path/CURRENT` at it with an atomic rename: a
        crash mid-save leaves the previous checkpoint loadable. Older generations are removed
        after the switch."""
        import zarr

        self._usable()
        root = os.fspath(path)
        os.makedirs(root, exist_ok=True)
        generation = f"gen-{self._clock.step_count:09d}-{secrets.token_hex(4)}"
        folder = os.path.join(root, generation)
        group = zarr.open_group(folder, mode="w")
        hyper = {k: v for k, v in self._hyper.items() if not callable(v)}
        group.attrs.update(
            format_version=checkpoint.FORMAT_VERSION,
            step_count=self._clock.step_count,
            skipped_steps=self._clock.skipped_steps,
            num_params=len(self._gens),
            hyperparameters=hyper,
            shapes=[list(g.shape[1:]) for g in self._gens],
            dtypes=[str(p.dtype) for p in self._gens],
        )
        stores, sums, keys = [], [], []
        for i, gen in enumerate(self._gens):
            s = dict(zip(self._names, _unstack(gen)[1:]))
            for name in self._names:
                # NaN as the fill value: every chunk is written (no chunk equals it), and a chunk
                # file gone missing reads as NaN, which load refuses
                stores.append(da.to_zarr(s[name], folder, component=f"{name}.{i}", compute=False, fill_value=np.nan))
                sums.append(_checksums(s[name]))
                keys.append((f"{name}.{i}", s[name].chunks))
        try:
            done = self._compute([*stores, *sums])
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # the previous checkpoint stays the current one
            raise
        manifest = {
            key: {"chunks": [list(c) for c in chunks], "crc32": np.asarray(crc).ravel().tolist()}
            for (key, chunks), crc in zip(keys, done[len(stores) :])
        }
        group.attrs.update(manifest=manifest)  # written last: a checkpoint with it is whole
        tmp = os.path.join(root, f".{POINTER}-{secrets.token_hex(4)}.tmp")
        with open(tmp, "w") as f:
            f.write(generation)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(root, POINTER))
        for entry in os.listdir(root):
            if entry.startswith("gen-") and entry != generation:
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)

    def load(self, path):
        """Restore a checkpoint written by `save` into this optimizer (same params,
        same variant). Anything wrong (no pointer, a pointer outside the folder, missing or
        mismatched arrays, non-finite or negative `square_avg` values, another variant)
        raises ValueError and changes nothing; a missing folder raises FileNotFoundError."""
        import zarr

        self._usable()
        root = os.fspath(path)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"checkpoint folder {root!r} does not exist")
        pointer = os.path.join(root, POINTER)
        try:
            if not stat.S_ISREG(os.stat(pointer).st_mode):  # a FIFO would block the read forever
                raise ValueError(f"{pointer!r} is not a regular file: not a fastrms.dask checkpoint")
            with open(pointer, "rb") as f:
                generation = f.read(256).decode("utf-8", "replace").strip()
        except OSError:
            raise ValueError(f"{root!r} has no readable {POINTER} pointer: not a fastrms.dask checkpoint") from None
        if not generation.startswith("gen-") or os.sep in generation or generation in (".", ".."):
            raise ValueError(f"{root!r}: {POINTER} names {generation!r}, not a generation of this folder")
        folder = os.path.join(root, generation)
        real_root = os.path.realpath(root)
        if os.path.islink(folder) or os.path.dirname(os.path.realpath(folder)) != real_root:
            raise ValueError(f"{folder!r} is a link: a checkpoint's generation must be a folder inside it")
        try:
            group = zarr.open_group(folder, mode="r")
            attrs = dict(group.attrs)
        except Exception as exc:
            raise ValueError(f"{folder!r} is not a readable Zarr group: {type(exc).__name__}: {exc}") from None
        step_count, skipped, hyper = self._check_attrs(attrs)
        manifest = attrs.get("manifest")
        if not isinstance(manifest, dict):
            raise ValueError(f"checkpoint {folder!r} has no manifest of its chunks: written by another fastrms?")
        states, sums = [], []
        for i, gen in enumerate(self._gens):
            p = _Shape.of(gen)
            state = {}
            for name in self._names:
                key = f"{name}.{i}"
                try:
                    a = da.from_zarr(folder, component=key)
                except Exception as exc:
                    raise ValueError(f"checkpoint {folder!r} has no usable array {key!r}: {exc}") from None
                if a.shape != p.shape or a.dtype != p.dtype:
                    raise ValueError(f"checkpoint array {key!r} is {a.dtype} {a.shape}, the param {p.dtype} {p.shape}")
                entry = manifest.get(key)
                if not isinstance(entry, dict) or entry.get("chunks") != [list(c) for c in a.chunks]:
                    raise ValueError(f"checkpoint array {key!r} is not chunked as its manifest says")
                sums.append((key, entry.get("crc32"), _checksums(a)))
                state[name] = a.rechunk(p.chunks)
            states.append(state)
        checks = [da.isfinite(s[n]).all() for s in states for n in self._names]
        checks += [(s["square_avg"] >= 0).all() for s in states]
        try:
            results = self._compute([*checks, *(crc for _, _, crc in sums)])
        except LostStateError:
            raise
        except Exception as exc:  # a truncated or junk chunk: the codec's own error
            raise ValueError(
                f"checkpoint {folder!r} has a chunk that cannot be read: {type(exc).__name__}: {exc}"
            ) from None
        for (key, expected, _), crc in zip(sums, results[len(checks) :]):
            if np.asarray(crc).ravel().tolist() != expected:
                raise ValueError(
                    f"checkpoint array {key!r} does not hold what was saved (a chunk differs from the manifest)"
                )
        if not all(results[: len(checks)]):
            raise ValueError(
                f"checkpoint {folder!r} holds NaN, infinite or negative square_avg values (a missing chunk?)"
            )
        params = [_layer(gen, 0) for gen in self._gens]
        self._gens = self._settle([self._stacked(p, s) for p, s in zip(params, states)])
        self._hyper = hyper
        self._clock = Clock(hyper, self._dtypes, step_count, skipped, self._clock.last_lr)

    def _compute(self, arrays):
        """`dask.compute(*arrays)`; on a `distributed` cluster, watching that no chunk of
        the optimizer's data is lost meanwhile (LostStateError within about a second, not a
        wait forever for a dead worker)."""
        client = _client()
        if client is None:
            return dask.compute(*arrays)
        futures = client.compute(list(arrays))
        _wait(client, futures, self._gens)
        return client.gather(futures)

    def _check_attrs(self, attrs):
        version = checkpoint.FORMAT_VERSION
        if attrs.get("format_version") != version:
            raise ValueError(f"checkpoint format_version must be {version}, got {attrs.get('format_version')!r}")
        if attrs.get("num_params") != len(self._gens):
            raise ValueError(
                f"checkpoint holds {attrs.get('num_params')!r} params, this optimizer has {len(self._gens)}"
            )
        if attrs.get("shapes") != [list(g.shape[1:]) for g in self._gens] or attrs.get("dtypes") != [
            str(p.dtype) for p in self._gens
        ]:
            raise ValueError("checkpoint shapes or dtypes differ from this optimizer's params")
        try:
            step_count = count("step_count", attrs.get("step_count"), minimum=0, maximum=STEP_MAX)
            skipped = count("skipped_steps", attrs.get("skipped_steps"), minimum=0, maximum=STEP_MAX)
            saved = attrs.get("hyperparameters")
            if not isinstance(saved, dict):
                raise ValueError("checkpoint has no hyperparameters")
            merged = {**self._hyper, **{k: v for k, v in saved.items() if k in O.NAMES}}
            hyper = O.check_hyperparameters(merged, tuple(p.dtype for p in self._gens))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint: {exc}") from None
        mine, theirs = O.formula(self._hyper), O.formula(hyper)
        differ = [k for k in mine if mine[k] != theirs[k]]
        if differ:
            raise ValueError("checkpoint is of another variant: " + ", ".join(f"{k}={theirs[k]}" for k in differ))
        return step_count, skipped, hyper
