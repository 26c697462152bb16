"""`fastrms.dask.RMSprop`'s checkpoints: a Zarr store per generation under one folder, and a
`CURRENT` pointer swapped in with an atomic rename.

A checkpoint folder holds `gen-<step>-<random>/` (a Zarr group: one array `"<name>.<i>"` per
state array of param `i`, chunked like it; attributes: `format_version`
(`fastrms.core.checkpoint.FORMAT_VERSION`, the one of every fastrms checkpoint), the counts, the
hyperparameters, the params' shapes and dtypes, and a manifest of every array's chunks with
the CRC-32 of each) and `CURRENT`, the name of the generation to load. Loading checks every
one of those before anything changes.
"""

import os
import secrets
import shutil
import stat

import dask.array as da
import numpy as np

from ..core import checkpoint
from ..core import options as O
from ..core.checks import STEP_MAX, count
from ._cluster import LostStateError, _checksums, _Shape

#: The small file in a checkpoint folder that names the current generation.
POINTER = "CURRENT"


def write(path, states, gens, hyper, clock, compute):
    """Write `states` (per param, name -> dask array) as a new generation under `path`, then
    point `CURRENT` at it (see `fastrms.dask.RMSprop.save`). `compute(arrays)` computes on
    the optimizer's scheduler, watching its data."""
    import zarr

    root = os.fspath(path)
    os.makedirs(root, exist_ok=True)
    generation = f"gen-{clock.step_count:09d}-{secrets.token_hex(4)}"
    folder = os.path.join(root, generation)
    group = zarr.open_group(folder, mode="w")
    group.attrs.update(
        format_version=checkpoint.FORMAT_VERSION,
        step_count=clock.step_count,
        skipped_steps=clock.skipped_steps,
        num_params=len(gens),
        hyperparameters={k: v for k, v in hyper.items() if not callable(v)},
        shapes=[list(g.shape[1:]) for g in gens],
        dtypes=[str(p.dtype) for p in gens],
    )
    stores, sums, keys = [], [], []
    for i, state in enumerate(states):
        for name, a in state.items():
            # NaN as the fill value: every chunk is written (no chunk equals it), and a chunk
            # file gone missing reads as NaN, which load refuses
            stores.append(da.to_zarr(a, folder, component=f"{name}.{i}", compute=False, fill_value=np.nan))
            sums.append(_checksums(a))
            keys.append((f"{name}.{i}", a.chunks))
    try:
        done = compute([*stores, *sums])
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


def _generation(root):
    """The folder `CURRENT` names, checked to be a generation inside `root`."""
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
    if os.path.islink(folder) or os.path.dirname(os.path.realpath(folder)) != os.path.realpath(root):
        raise ValueError(f"{folder!r} is a link: a checkpoint's generation must be a folder inside it")
    return folder


def read(path, gens, names, hyper, compute):
    """`(step_count, skipped_steps, hyperparameters, states)` of the checkpoint under `path`,
    every check done (see `fastrms.dask.RMSprop.load`); `states` are dask arrays rechunked
    like the params, not yet computed into the optimizer."""
    import zarr

    folder = _generation(os.fspath(path))
    try:
        attrs = dict(zarr.open_group(folder, mode="r").attrs)
    except Exception as exc:
        raise ValueError(f"{folder!r} is not a readable Zarr group: {type(exc).__name__}: {exc}") from None
    step_count, skipped, hyper = check_attrs(attrs, gens, hyper)
    manifest = attrs.get("manifest")
    if not isinstance(manifest, dict):
        raise ValueError(f"checkpoint {folder!r} has no manifest of its chunks: written by another fastrms?")
    states, sums = [], []
    for i, gen in enumerate(gens):
        p = _Shape.of(gen)
        state = {}
        for name in names:
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
    checks = [da.isfinite(s[n]).all() for s in states for n in names]
    checks += [(s["square_avg"] >= 0).all() for s in states]
    try:
        results = compute([*checks, *(crc for _, _, crc in sums)])
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
        raise ValueError(f"checkpoint {folder!r} holds NaN, infinite or negative square_avg values (a missing chunk?)")
    return step_count, skipped, hyper, states


def check_attrs(attrs, gens, hyper):
    """The counts and hyperparameters of a generation's attributes, checked against the
    optimizer's params (`gens`) and options (`hyper`: same variant)."""
    version = checkpoint.FORMAT_VERSION
    if attrs.get("format_version") != version:
        raise ValueError(f"checkpoint format_version must be {version}, got {attrs.get('format_version')!r}")
    if attrs.get("num_params") != len(gens):
        raise ValueError(f"checkpoint holds {attrs.get('num_params')!r} params, this optimizer has {len(gens)}")
    if attrs.get("shapes") != [list(g.shape[1:]) for g in gens] or attrs.get("dtypes") != [str(p.dtype) for p in gens]:
        raise ValueError("checkpoint shapes or dtypes differ from this optimizer's params")
    try:
        step_count = count("step_count", attrs.get("step_count"), minimum=0, maximum=STEP_MAX)
        skipped = count("skipped_steps", attrs.get("skipped_steps"), minimum=0, maximum=STEP_MAX)
        saved = attrs.get("hyperparameters")
        if not isinstance(saved, dict):
            raise ValueError("checkpoint has no hyperparameters")
        merged = {**hyper, **{k: v for k, v in saved.items() if k in O.NAMES}}
        loaded = O.check_hyperparameters(merged, tuple(p.dtype for p in gens))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint: {exc}") from None
    mine, theirs = O.formula(hyper), O.formula(loaded)
    differ = [k for k in mine if mine[k] != theirs[k]]
    if differ:
        raise ValueError("checkpoint is of another variant: " + ", ".join(f"{k}={theirs[k]}" for k in differ))
    return step_count, skipped, loaded
