"""The fused RMSprop step over Dask arrays: one task per chunk, each running the out-of-place
kernel (:func:`fastrms.functional.rmsprop_step`) on its block, for params and state that
live on a ``distributed`` cluster. ``docs/algorithm.md`` is the update; the bits are those of
:class:`fastrms.RMSprop` on the same data, whatever the chunking.

- :func:`rmsprop_step`: the lazy pure step, ``(param, grad, state, t, lr, ...) -> (new_param,
  new_state)``; nothing is computed until you ask.
- :class:`RMSprop`: the optimizer-shaped wrapper: params and state held as persisted dask
  arrays, ``step(grads)`` builds the next generation, persists it and waits for it (errors
  surface there); ``save``/``load`` write and read the state as a Zarr store.

Importing ``fastrms`` never imports dask; importing ``fastrms.dask`` without it raises one
ImportError saying what to install.
"""

try:
    import dask
    import dask.array as da
except ImportError:  # pragma: no cover - exercised in a subprocess without dask
    raise ImportError(
        "fastrms.dask needs Dask; install it with: pip install 'fastrms[dask]' (dask[array], distributed, zarr)"
    ) from None

import os
import secrets
import shutil

import numpy as np

from . import functional
from . import options as O
from ._checks import count
from .presets import preset_options

__all__ = ["LostStateError", "RMSprop", "init_state", "rmsprop_step"]

FORMAT_VERSION = 1
#: The small file in a checkpoint folder that names the current generation.
POINTER = "CURRENT"


def _block_step(param, grad, *state_and_args):
    """One chunk: the fused out-of-place step into one stacked array ``(1 + k, *block)``
    (param, then the state in ``names`` order), so the whole update is one task."""
    *state, names, t, lr, beta, epsilon, options = state_and_args
    # blocks may be views (a slice of a bigger array), broadcasts (zeros_like) or, sent
    # between workers, unaligned buffers: the kernel reads aligned C-contiguous memory, so
    # those are copied; computed blocks pass as they are
    param, grad = np.require(param, requirements="CA"), np.require(grad, requirements="CA")
    state = [np.require(a, requirements="CA") for a in state]
    out = np.empty((1 + len(names), *param.shape), param.dtype)
    functional.rmsprop_step(
        param, grad, dict(zip(names, state)), t, lr, beta, epsilon,
        out=(out[0], {name: out[1 + i] for i, name in enumerate(names)}), **options,
    )  # fmt: skip
    return out


def _check_array(label, a, like=None):
    if not isinstance(a, da.Array):
        raise TypeError(f"{label} must be a dask.array.Array, got {type(a).__name__}")
    if a.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"{label} must have dtype float32 or float64, got {a.dtype}")
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
    """The variant's initial state for the dask array ``param`` (chunked like it)."""
    _check_array("param", param)
    hyper = O.resolve(options, "init_state()")
    state = {name: da.zeros_like(param) for name in O.state_names(hyper)}
    scale = O.BY_NAME["initial_scale"].check(hyper["initial_scale"])
    if scale:
        state["square_avg"] = da.full_like(param, scale)
    return state


def rmsprop_step(
    param, grad, state, t, learning_rate, beta=O.DEFAULTS["beta"], epsilon=O.DEFAULTS["epsilon"], **options
):
    """Step ``t`` (1-based) of RMSprop over dask arrays, lazily: returns ``(new_param,
    new_state)``, dask arrays chunked like ``param``. ``state`` is a dict of dask arrays named
    as in :func:`fastrms.functional.rmsprop_step` (``square_avg``, ``grad_avg``,
    ``momentum_buffer`` as the variant keeps them), or None for the initial state.

    The graph is one task per chunk (a ``map_blocks`` over param, grad and state), each
    running the fused out-of-place kernel on its block; input blocks are never written.
    ``learning_rate`` is a number (evaluate a schedule on the client). Grads and state must be
    chunked like ``param`` (a clear error says so otherwise). ``clip_global_norm`` is refused
    (it needs every chunk before the step); ``skip_nonfinite`` acts per block here (use
    :class:`RMSprop` for a global skip).
    """
    _check_array("param", param)
    _check_array("grad", grad, param)
    t = count("t", t, minimum=1)
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
    return stacked[0], {name: stacked[1 + i] for i, name in enumerate(names)}


def _client():
    """The active ``distributed.Client``, or None (then dask's local schedulers run)."""
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def _take(key):
    """On the worker holding ``key``: its data, under the new task's own key (no copy)."""
    from distributed import get_worker

    return get_worker().data[key]


class LostStateError(RuntimeError):
    """Chunks of the params or state were lost with a worker (they have no lineage to be
    recomputed from): resume from the last checkpoint."""


def _wait(client, futures, watch):
    """Wait for ``futures``; every second, check that every chunk of ``watch`` (the data the
    work reads) still has a worker holding it, and raise LostStateError if one has none
    (a restricted re-run could otherwise wait forever for a dead worker)."""
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
    for f in futures:
        if f.status != "finished":
            f.result()


def _detach(client, arrays, watch):
    """Wait for the persisted ``arrays`` (errors of dead workers surface here), then re-key
    every chunk with a task that has no dependencies and runs where the data already is:
    the scheduler can then forget the lineage, so its task count stays flat across steps
    (without this it grows by every step's tasks). The price: a chunk lost with its worker
    cannot be recomputed; the next step raises and the run resumes from a checkpoint."""
    from distributed import futures_of

    futures = futures_of(arrays)
    _wait(client, futures, watch)
    who = client.who_has(futures)
    out = []
    for a in arrays:
        name = f"fastrms-state-{secrets.token_hex(8)}"
        graph = {}
        for key in dask.core.flatten(a.__dask_keys__()):
            new = (name, *key[1:])
            graph[new] = client.submit(
                _take, key, key=new, workers=list(who[key]), allow_other_workers=False, pure=False
            )
        out.append((graph, name, a))
    new = [f for graph, _, _ in out for f in graph.values()]
    _wait(client, new, arrays)
    return [da.Array(graph, name, a.chunks, dtype=a.dtype) for graph, name, a in out]


class RMSprop:
    """RMSprop over dask arrays on a cluster: params and state held as persisted dask arrays.

    ``RMSprop(params, learning_rate, beta, epsilon, **options)`` takes a dask array or a
    sequence of them and :class:`fastrms.RMSprop`'s options, presets (:meth:`like`) and
    validation (``clip_global_norm`` excepted). ``step(grads)`` evaluates the schedule on
    the client, builds the next generation with :func:`rmsprop_step`, persists it (on the
    active ``distributed.Client`` if there is one) and waits for it, so each step's graph is
    one task per chunk on top of already-computed data. On a cluster the persisted chunks are
    re-keyed without their lineage (:func:`_detach`), so the scheduler's task count stays flat
    over any number of steps; a worker that dies takes its chunks with it, and the next
    step raises a RuntimeError telling you to resume from the last checkpoint.
    With ``skip_nonfinite`` a step whose grads hold a NaN or an infinity (one reduction over
    the grads, computed first) changes nothing.
    """

    def __init__(self, params, learning_rate=O.DEFAULTS["learning_rate"], beta=O.DEFAULTS["beta"],
                 epsilon=O.DEFAULTS["epsilon"], **options):  # fmt: skip
        self._single = isinstance(params, da.Array)
        given = [params] if self._single else list(params) if hasattr(params, "__iter__") else None
        if given is None or isinstance(params, (str, bytes, dict)):
            raise TypeError(f"params must be a dask array or a sequence of them, got {type(params).__name__}")
        arrays = [_check_array("params" if self._single else f"params[{i}]", p) for i, p in enumerate(given)]
        hyper = O.resolve({**options, "learning_rate": learning_rate, "beta": beta, "epsilon": epsilon})
        if hyper["clip_global_norm"] is not None:
            _hyperparameters(0.0, beta, epsilon, {"clip_global_norm": hyper["clip_global_norm"]}, np.float64)
        self._hyper = O.check_hyperparameters(hyper, tuple(dict.fromkeys(a.dtype for a in arrays)))
        self._names = O.state_names(self._hyper)
        self._step_count = 0
        self._skipped_steps = 0
        kernel = {k: self._hyper[k] for k in O.NAMES if k != "learning_rate"}
        states = [init_state(p, **kernel) for p in arrays]
        self._params, self._states = self._persist(arrays, states)

    @classmethod
    def like(cls, name, params, **overrides):
        """An optimizer with library ``name``'s defaults and formula (see :mod:`fastrms.presets`)."""
        return cls(params, **preset_options(name, overrides))

    # ------------------------------------------------------------------ properties

    @property
    def params(self):
        """The current params: persisted dask arrays, in the structure given."""
        return self._params[0] if self._single else list(self._params)

    @property
    def state(self):
        """The state of each param: dicts of persisted dask arrays (PyTorch's names)."""
        return self._states[0] if self._single else list(self._states)

    @property
    def step_count(self):
        return self._step_count

    @property
    def skipped_steps(self):
        return self._skipped_steps

    @property
    def hyperparameters(self):
        return dict(self._hyper)

    # ------------------------------------------------------------------ the step

    def _check_alive(self):
        """On a cluster: every chunk of the params and state still has a worker holding it."""
        client = _client()
        if client is None:
            return
        from distributed import futures_of

        arrays = [*self._params, *(s[n] for s in self._states for n in s)]
        who = client.who_has(futures_of(arrays))
        if any(not holders for holders in who.values()):
            raise LostStateError(
                "chunks of the params or state were lost with a worker (each step drops their lineage so the "
                "scheduler does not grow): resume from your last checkpoint (RMSprop.load)"
            )

    def _persist(self, params, states):
        """Persist params and state together (on the active client, if any) and wait, so a
        failure surfaces here and the next step starts from computed data."""
        flat = [*params, *(s[name] for s in states for name in sorted(s))]
        client = _client()
        if client is not None:
            watch = [*getattr(self, "_params", []), *(s[n] for s in getattr(self, "_states", []) for n in s)]
            try:
                done = _detach(client, client.persist(flat, optimize_graph=False), watch)
            except Exception as exc:
                raise LostStateError(
                    f"the step failed on the cluster ({type(exc).__name__}: {exc}); params and state of this step "
                    "may be lost: resume from your last checkpoint (RMSprop.load)"
                ) from exc
        else:
            done = dask.persist(*flat)
        done = list(done)
        out_params = done[: len(params)]
        out_states, at = [], len(params)
        for s in states:
            names = sorted(s)
            out_states.append(dict(zip(names, done[at : at + len(names)])))
            at += len(names)
        return out_params, out_states

    def step(self, grads):
        """One step: ``grads`` (dask arrays chunked like the params, in their structure)."""
        grads = [grads] if self._single else list(grads)
        if len(grads) != len(self._params):
            raise ValueError(f"grads must hold {len(self._params)} arrays, one per param, got {len(grads)}")
        for i, (g, p) in enumerate(zip(grads, self._params)):
            _check_array("grads" if self._single else f"grads[{i}]", g, p)
        self._check_alive()
        if self._hyper["skip_nonfinite"]:
            finite = dask.compute(*(da.isfinite(g).all() for g in grads))
            if not all(finite):
                self._skipped_steps += 1
                return
        lr = self._hyper["learning_rate"]
        if callable(lr):
            lr = lr(self._step_count)
            O.check_learning_rate_fit(
                "learning_rate (the schedule's value)",
                O.BY_NAME["learning_rate"].check(float(lr)),
                self._hyper["weight_decay"],
                tuple(p.dtype for p in self._params),
            )
        t = self._step_count + 1
        options = {k: self._hyper[k] for k in O.NAMES if k not in ("learning_rate", "beta", "epsilon")}
        options["skip_nonfinite"] = False  # checked globally above
        new = [
            rmsprop_step(p, g, s, t, float(lr), self._hyper["beta"], self._hyper["epsilon"], **options)
            for p, g, s in zip(self._params, grads, self._states)
        ]
        self._params, self._states = self._persist([p for p, _ in new], [s for _, s in new])
        self._step_count = t

    # ------------------------------------------------------------------ checkpoints (Zarr)

    def save(self, path):
        """Write the state (not the params), step counts, hyperparameters and a format version
        as a Zarr store in a new folder under ``path``, written in parallel by the workers
        (chunked like the arrays), then point ``path/CURRENT`` at it with an atomic rename: a
        crash mid-save leaves the previous checkpoint loadable. Older generations are removed
        after the switch."""
        import zarr

        root = os.fspath(path)
        os.makedirs(root, exist_ok=True)
        generation = f"gen-{self._step_count:09d}-{secrets.token_hex(4)}"
        folder = os.path.join(root, generation)
        group = zarr.open_group(folder, mode="w")
        hyper = {k: v for k, v in self._hyper.items() if not callable(v)}
        group.attrs.update(
            format_version=FORMAT_VERSION,
            step_count=self._step_count,
            skipped_steps=self._skipped_steps,
            num_params=len(self._params),
            hyperparameters=hyper,
            shapes=[list(p.shape) for p in self._params],
            dtypes=[str(p.dtype) for p in self._params],
        )
        stores = []
        for i, s in enumerate(self._states):
            for name in self._names:
                stores.append(da.to_zarr(s[name], folder, component=f"{name}.{i}", compute=False))
        dask.compute(*stores)
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
        """Restore a checkpoint written by :meth:`save` into this optimizer (same params,
        same variant). Anything wrong (no pointer, a pointer outside the folder, missing or
        mismatched arrays, non-finite or negative ``square_avg`` values, another variant)
        raises ValueError and changes nothing; a missing folder raises FileNotFoundError."""
        import zarr

        root = os.fspath(path)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"checkpoint folder {root!r} does not exist")
        try:
            with open(os.path.join(root, POINTER)) as f:
                generation = f.read(256).strip()
        except OSError:
            raise ValueError(f"{root!r} has no readable {POINTER} pointer: not a fastrms.dask checkpoint") from None
        if not generation.startswith("gen-") or os.sep in generation or generation in (".", ".."):
            raise ValueError(f"{root!r}: {POINTER} names {generation!r}, not a generation of this folder")
        folder = os.path.join(root, generation)
        try:
            group = zarr.open_group(folder, mode="r")
            attrs = dict(group.attrs)
        except Exception as exc:
            raise ValueError(f"{folder!r} is not a readable Zarr group: {type(exc).__name__}: {exc}") from None
        step_count, skipped, hyper = self._check_attrs(attrs)
        states = []
        for i, p in enumerate(self._params):
            state = {}
            for name in self._names:
                key = f"{name}.{i}"
                try:
                    a = da.from_zarr(folder, component=key)
                except Exception as exc:
                    raise ValueError(f"checkpoint {folder!r} has no usable array {key!r}: {exc}") from None
                if a.shape != p.shape or a.dtype != p.dtype:
                    raise ValueError(f"checkpoint array {key!r} is {a.dtype} {a.shape}, the param {p.dtype} {p.shape}")
                state[name] = a.rechunk(p.chunks)
            states.append(state)
        checks = [da.isfinite(s[n]).all() for s in states for n in self._names]
        checks += [(s["square_avg"] >= 0).all() for s in states]
        if not all(dask.compute(*checks)):
            raise ValueError(f"checkpoint {folder!r} holds NaN, infinite or negative square_avg values")
        self._params, self._states = self._persist(self._params, states)
        self._step_count, self._skipped_steps = step_count, skipped
        self._hyper = hyper

    def _check_attrs(self, attrs):
        if attrs.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"checkpoint format_version must be {FORMAT_VERSION}, got {attrs.get('format_version')!r}")
        if attrs.get("num_params") != len(self._params):
            raise ValueError(
                f"checkpoint holds {attrs.get('num_params')!r} params, this optimizer has {len(self._params)}"
            )
        if attrs.get("shapes") != [list(p.shape) for p in self._params] or attrs.get("dtypes") != [
            str(p.dtype) for p in self._params
        ]:
            raise ValueError("checkpoint shapes or dtypes differ from this optimizer's params")
        try:
            step_count = count("step_count", attrs.get("step_count"), minimum=0)
            skipped = count("skipped_steps", attrs.get("skipped_steps"), minimum=0)
            saved = attrs.get("hyperparameters")
            if not isinstance(saved, dict):
                raise ValueError("checkpoint has no hyperparameters")
            merged = {**self._hyper, **{k: v for k, v in saved.items() if k in O.NAMES}}
            hyper = O.check_hyperparameters(merged, tuple(p.dtype for p in self._params))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint: {exc}") from None
        mine, theirs = O.formula(self._hyper), O.formula(hyper)
        differ = [k for k in mine if mine[k] != theirs[k]]
        if differ:
            raise ValueError("checkpoint is of another variant: " + ", ".join(f"{k}={theirs[k]}" for k in differ))
        return step_count, skipped, hyper
