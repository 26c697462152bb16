"""The client side of `fastrms.dask`: the checks of the dask arrays it is given, a
generation's layers as dask arrays (views of the stacked chunks), and on a `distributed`
cluster waiting for work while watching that no chunk of the optimizer's data is lost,
re-keying computed chunks so the scheduler forgets their lineage, and chunk checksums for
checkpoints."""

import secrets
import zlib
from typing import NamedTuple

import dask
import dask.array as da
import numpy as np

from ._blocks import _generation_step, _Key, _Missing, _pulled_step, _row


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


def _check_array(label, a, like=None):
    """`a` checked: a dask array of float32 or float64 with known chunk sizes; with `like`
    (a param, or its `_Shape`), of its dtype, shape and chunks. Returns `a`."""
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


def computed(client, grads, gens):
    """`grads` persisted on the cluster (as given when they already are) and computed,
    watching the generations `gens` (`_wait`)."""
    from distributed import futures_of

    out = []
    for g in grads:
        keys = set(dask.core.flatten(g.__dask_keys__()))
        if {f.key for f in futures_of(g)} != keys:
            g = client.persist(g)
        out.append(g)
    _wait(client, futures_of(out), gens)
    return out


def step(client, gens, grads, args, donate, broken):
    """The next generation of `gens` (each param's chunks stacked with its state): every
    chunk's step (`_pulled_step`, `args` its keyword arguments) on the worker holding it and
    its grad's chunk, one `client.map` per worker, one wait; a chunk whose grad is elsewhere
    is stepped where the scheduler brings the two together. With `donate`, `broken(why)` is
    told when the step fails after chunks may have been written over."""
    from distributed import futures_of

    def chunks(a):
        by_key = {f.key: f for f in futures_of(a)}
        return [by_key[k] for k in dask.core.flatten(a.__dask_keys__())]

    generations = gens
    gens, grad_chunks = [chunks(g) for g in generations], [chunks(g) for g in grads]
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
                        workers=[worker], allow_other_workers=False, pure=False, donate=donate,
                        **args)  # fmt: skip
        pulled += zip(fs, tasks)
    watch = [*generations, *grads]
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
        if donate:
            broken(str(exc))
        raise
    except Exception as exc:
        if donate:
            broken(f"{type(exc).__name__}: {exc}")
        raise LostStateError(
            f"the step failed on the cluster ({type(exc).__name__}: {exc}); params and state of this step may "
            "be lost: resume from your last checkpoint (RMSprop.load)"
        ) from exc
    return [_array({f.key: f for at, f in done.items() if at[0] == i}, gen) for i, gen in enumerate(generations)]
