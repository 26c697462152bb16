"""The fused RMSprop step over Dask arrays: one task per chunk, each running the out-of-place
kernel (`fastrms.functional.rmsprop_step`) on its block, for params and state that
live on a `distributed` cluster. [docs/algorithm.md](algorithm.md) is the update; the bits are those of
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
    raise ImportError("fastrms.dask needs Dask; install it with: pip install 'dask[array]' distributed zarr") from None

from typing import TYPE_CHECKING

import numpy as np

from .. import functional
from ..core import guard, spec
from ..core import options as O
from ..core.checks import STEP_MAX, count
from ..core.clock import Clock
from ..presets import preset_options
from . import _checkpoint, _cluster
from ._blocks import _block_step, _generation_step, _stack, release_buffers
from ._cluster import (
    LostStateError,
    _check_array,
    _client,
    _detach,
    _indices,
    _layer,
    _Shape,
    _unstack,
    _wait,
)  # fmt: skip

if TYPE_CHECKING:  # the static types of **options (generated from the options table)
    from typing_extensions import Unpack

    from .._typing import Options

__all__ = ["LostStateError", "RMSprop", "init_state", "release_buffers", "rmsprop_step"]


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
    O.check_native_storage(hyper, "fastrms.dask.init_state()")
    state = {name: da.zeros_like(param) for name in spec.of(hyper).names}
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
    names = spec.of(hyper).names
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
        O.check_native_storage(self._hyper, "fastrms.dask.RMSprop")
        if self._hyper["dense_rows"]:
            raise ValueError("dense_rows=True is an option of step_rows, which fastrms.dask.RMSprop does not have")
        self._names = spec.of(self._hyper).names
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
    def state_nbytes(self):
        """Bytes the optimizer's state takes across the cluster: each param's state arrays
        (PyTorch's names, the param's dtype), one copy (a donating step writes the new
        generation over the old; without `donate` a step holds two generations for a
        moment)."""
        return sum(int(g.nbytes) * len(self._names) // (1 + len(self._names)) for g in self._gens)

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
            grads = _cluster.computed(client, grads, self._gens)
        verdict = guard.GO
        if self._hyper["skip_nonfinite"]:
            finite = dask.compute(*(da.isfinite(g).all() for g in grads))
            verdict = guard.GO if all(finite) else guard.SKIP
        self._clock.take(verdict, lambda scalars: self._write(client, grads, scalars.lr))

    def _write(self, client, grads, lr):
        """The next generation: every chunk's fused step at learning rate `lr`, persisted."""
        t = self._clock.step_count + 1
        options = {k: self._hyper[k] for k in O.NAMES if k not in ("learning_rate", "beta", "epsilon")}
        options["skip_nonfinite"] = False  # checked globally, before the step
        args = dict(names=self._names, t=t, lr=float(lr), beta=self._hyper["beta"],
                    epsilon=self._hyper["epsilon"], options=options)  # fmt: skip
        if client is None:
            new = []
            for gen, g in zip(self._gens, grads):
                idx = _indices(g.ndim)
                new.append(da.blockwise(_generation_step, (0, *idx), gen, (0, *idx), g, idx, dtype=gen.dtype, **args))
            self._gens = list(dask.persist(*new))
        else:
            self._gens = _cluster.step(client, self._gens, grads, args, self._donate, self._break)

    def _break(self, why):
        """A donating step failed: the params and state may be half updated (see `_usable`)."""
        self._broken = why

    # ------------------------------------------------------------------ checkpoints (Zarr)

    def save(self, path):
        """Write the state (not the params), step counts, hyperparameters and a format version
        as a Zarr store in a new folder under `path`, written in parallel by the workers
        (chunked like the arrays), with a CRC-32 per chunk in its manifest, then point
        `path/CURRENT` at it with an atomic rename: a crash mid-save leaves the previous
        checkpoint loadable. Older generations are removed after the switch."""
        self._usable()
        states = [dict(zip(self._names, _unstack(gen)[1:])) for gen in self._gens]
        _checkpoint.write(path, states, self._gens, self._hyper, self._clock, self._compute)

    def load(self, path):
        """Restore a checkpoint written by `save` into this optimizer (same params,
        same variant). Anything wrong (no pointer, a pointer outside the folder, missing or
        mismatched arrays, a chunk whose CRC-32 differs from the manifest, non-finite or
        negative `square_avg` values, another variant) raises ValueError and changes
        nothing; a missing folder raises FileNotFoundError."""
        self._usable()
        step_count, skipped, hyper, states = _checkpoint.read(path, self._gens, self._names, self._hyper, self._compute)
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
