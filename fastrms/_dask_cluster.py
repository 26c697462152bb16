"""The client side of `fastrms.dask`: a generation's layers as dask arrays (views of the
stacked chunks), and on a `distributed` cluster waiting for work while watching that no
chunk of the optimizer's data is lost, re-keying computed chunks so the scheduler forgets
their lineage, and chunk checksums for checkpoints."""

import secrets
import zlib
from typing import NamedTuple

import dask
import dask.array as da
import numpy as np

from ._dask_blocks import _row


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
