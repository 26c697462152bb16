"""The RMSprop optimizer: validates, holds the state, and hands each array to a fused kernel.

The update each kernel applies is in [docs/algorithm.md](algorithm.md) (and `fastrms.kernels.element`);
the options are declared once, in `fastrms.core.options`; checkpoints are
`fastrms.core.checkpoint`'s.
"""

import math
import os
import threading
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import kernels
from .backend import cpu
from .backend.layout import Slot
from .core import checkpoint, guard, memory, runtime, spec
from .core import options as O
from .core import rows as rows_step
from .core.clock import Clock
from .core.options import check_hyperparameters
from .kernels import contiguous_address, storage
from .presets import preset_options

if TYPE_CHECKING:  # the static types of **options (generated from the options table)
    from typing_extensions import Unpack

    from ._typing import Options

__all__ = ["RMSprop"]


class RMSprop:
    """RMSprop over NumPy float arrays, each step one fused in-place Numba pass per array.

    Per element, at step `t` with grad `g` (the plain variant; [docs/algorithm.md](algorithm.md) gives
    every option's term):

        v <- beta * v + (1 - beta) * g^2
        param <- param - lr * g / (sqrt(v) + epsilon)

    Every option after `epsilon` is keyword-only; all are declared once, in
    `fastrms.core.options.OPTIONS`, from which the list below is written.

    Parameters
    ----------
    params : ndarray or sequence of ndarray
        float32 or float64, C-contiguous, writeable, any shape; updated in place. `step`
        then takes grads of the same structure: one array, or a sequence of as many. A
        float32 param's grad may also be `ml_dtypes.bfloat16` or `numpy.float16` (grads
        from a 16-bit model): the step reads their float32 values, exactly. Params may also
        be all `ml_dtypes.bfloat16` or all `numpy.float16` (a model kept in 16 bits): each
        then gets a float32 master in the optimizer's state (`master_param.<i>` in
        `state_dict`), made from its values, which the step updates and writes back rounded
        to nearest even, in the same pass (as `copy_to` does; its grads float32 or 16-bit).
        A 16-bit param element written from outside since the last step (a restore, an
        edit: it is no longer its master rounded) becomes its master first, in that pass:
        `master <- float32(param) if param != round(master) else master`.
    learning_rate : float or callable, default 0.001
        A number >= 0, or a schedule `count -> lr` (`count` = steps already taken; see
        `fastrms.schedules`).
    beta : float, default 0.9
        Decay of the squared-gradient average, in [0, 1) (PyTorch `alpha`, Keras `rho`,
        TF1/optax `decay`).
    epsilon : float, default 1e-08
        Greater than 0; added outside the root (PyTorch, the seed) or, with `eps_in_sqrt`, inside it
        (Keras, TF1, optax).
    copy_to : ndarray or sequence of ndarray, optional
        Low-precision copies of float32 params (master weights): `ml_dtypes.bfloat16` or
        `numpy.float16` arrays (all of one dtype) of the params' structure and shapes. Every
        step writes each updated param, rounded to nearest even, into its copy in the same
        pass (`copy = bf16(param)`, or `float16(param)`: inf beyond 65504); a refused step
        writes neither. The copies are the caller's, as the params are: not checkpointed.
    momentum : float, default 0.0
        Momentum >= 0; 0 keeps no momentum buffer.
    centered : bool, default False
        Divide by the root of the variance estimate `v - m^2` (clamped at 0).
    nesterov : bool, default False
        Nesterov momentum; needs momentum > 0.
    lr_in_momentum : bool, default False
        Accumulate `lr * u` in the momentum buffer (Keras, TF1, optax) instead of `u` (PyTorch).
    weight_decay : float, default 0.0
        Weight decay >= 0 (L2 on the gradient, or decoupled).
    decoupled_weight_decay : bool, default False
        Shrink the parameter by `lr * weight_decay` before the update (Keras 3, AdamW style).
    maximize : bool, default False
        Ascend instead of descend.
    bias_correction : bool, default False
        Divide `v` and `m` by `1 - beta^t`.
    eps_in_sqrt : bool, default False
        `sqrt(v + eps)` instead of `sqrt(v) + eps`.
    initial_scale : float, default 0.0
        Starting value of `square_avg` (TF1 uses 1.0).
    state_storage : str, default 'native'
        How the state is stored: "native" (the params' dtype), "bfloat16" (float32 params only: half
        the state's bytes; the update computes in float32 from the stored values and stores its
        result rounded to nearest even, as `torch.bfloat16` does; needs `ml_dtypes`, the `bfloat16`
        extra) or "8bit" (float32 params only: a quarter of the bytes and a little more, in blocks
        of 256 codes and a float32 scale, dequantised, stepped in float32 and requantised in one
        pass; see [docs/algorithm.md](algorithm.md)).
    state_layout : str, default 'elementwise'
        The shape of `square_avg`: "elementwise" (one value per element) or "rowwise" (one per row
        of each param, its first axis, a 1-D param's rows being its elements: `v <- beta * v + (1 -
        beta) * mean(g^2)` over the row, as FBGEMM's rowwise optimizers keep an embedding table's
        state; with state_storage='native', not centered; see [docs/algorithm.md](algorithm.md)).
    skip_nonfinite : bool, default False
        A step whose grads hold a NaN or an infinity changes nothing and is counted in
        `skipped_steps`.
    dense_rows : bool, default False
        `step_rows` replays, when a row is touched again, the zero-gradient steps it missed (closed
        form), so a sparse run equals a dense one up to rounding; off: lazy, a row's state decays
        only when it is touched (TensorFlow's sparse ops, torch's SparseAdam).
    clip_global_norm : float or None, default None
        `max_norm` > 0, or None: scale every grad, as the kernel reads it, by `min(1, max_norm /
        (norm + 1e-6))`, `norm` the 2-norm over all grads (`torch.nn.utils.clip_grad_norm_`'s
        formula).
    clip_value : float or None, default None
        `c` > 0, or None: clamp every grad element to `[-c, c]` as the kernel reads it
        (`torch.nn.utils.clip_grad_value_`); a NaN passes through (keras `clipvalue`).

    Notes
    -----
    The state arrays, allocated once, are named as PyTorch names them: `square_avg`,
    `grad_avg` (centered) and `momentum_buffer` (momentum > 0).

    Examples
    --------
    >>> import numpy as np, fastrms
    >>> w = np.ones(3, np.float32)
    >>> opt = fastrms.RMSprop(w, learning_rate=0.01, momentum=0.9)
    >>> opt.step(np.full(3, 0.5, np.float32))
    >>> w  # the first step moves each element by lr / sqrt(1 - beta)
    array([0.96837723, 0.96837723, 0.96837723], dtype=float32)
    """

    def __new__(cls, params: Any = None, *args: Any, **kwargs: Any) -> "RMSprop":
        # params on a CUDA device: the same optimizer, stepped by the CUDA backend (`DeviceRMSprop`)
        if cls is RMSprop and _on_device(params):
            return super().__new__(DeviceRMSprop)
        return super().__new__(cls)

    def __init__(
        self,
        params: "np.ndarray | Sequence[np.ndarray]",
        learning_rate: "float | Callable[[int], float]" = 0.001,
        beta: float = 0.9,
        epsilon: float = 1e-8,
        *,
        copy_to: "np.ndarray | Sequence[np.ndarray] | None" = None,
        **options: "Unpack[Options]",
    ) -> None:
        options = O.resolve({**options, "learning_rate": learning_rate, "beta": beta, "epsilon": epsilon})
        if memory.iterable(params):  # a generator is read once, here: every check below sees the same list
            params = list(params)
        low = memory.low_params(params)  # 16-bit params: float32 masters of the optimizer's, each param their copy
        if low is None:
            self._single, given, arrays = memory.param_arrays(params)
        else:
            if copy_to is not None:
                raise ValueError("copy_to is for float32 params; 16-bit params are written from their own masters")
            self._single, given, arrays, copies, copy_codec = low
            copy_codec = storage.MASTERS[copy_codec.tag]  # the copies are the params: what is written there counts
        self._masters = low is not None
        self._dtypes = tuple(dict.fromkeys(a.dtype for a in arrays))
        hyper = check_hyperparameters(options, self._dtypes)  # in range, and fitting the params' dtypes
        if copy_to is not None:
            copies, copy_codec = memory.copies(copy_to, arrays, self._single)
        elif low is None:
            copies, copy_codec = None, None
        what = "16-bit params (written from their masters)" if low is not None else "copy_to"
        if copies is not None and hyper["dense_rows"]:
            raise ValueError(f"{what} cannot be combined with dense_rows=True: step_rows does not write the copies")
        if copies is not None and hyper["state_layout"] == "rowwise":
            raise ValueError(f"{what} cannot be combined with state_layout='rowwise': the row shells write no copies")
        self._stepping = False  # one step at a time: a second thread's step raises (`_enter`)
        self._state = threading.RLock()  # a step, a snapshot (state_dict, save) or a load: one at a time, waiting
        self._copies_given = None if copy_to is None else ([copy_to] if self._single else list(copy_to))
        self._configure(hyper, Clock(hyper, self._dtypes))
        self._shown = spec.view_dtype(self._spec.codec, self._dtypes[0]) if self._dtypes else None
        self._slots = slots = [Slot(p, a, self._spec.names) for p, a in zip(given, arrays)]
        self._copy_to = copies  # the copies every step writes (`copy_to`'s, or the 16-bit params'), or None
        for slot, flat in zip(slots, copies or ()):
            slot.copy = flat
        if self._dense_rows:
            for slot in slots:
                if len(slot.shape) == 2:
                    slot.row_step = np.zeros(slot.shape[0], np.int64)
        # allocates the state, group by group, and picks the kernels; it starts the thread
        # pool for big arrays: a threading layer that cannot start fails here
        self._plan = cpu.Plan(slots, hyper, self._spec, copy_codec)
        self._owned = memory.Owned(slots)  # what a step writes: params and the state
        self._last_grad_norm = None

    @classmethod
    def like(cls, name: str, params: Any, **overrides: Any) -> "RMSprop":
        """An optimizer with library `name`'s defaults and formula ("seed", "torch",
        "keras", "tf1", "optax"); `overrides` may use that library's spellings (`lr`,
        `alpha`, `rho`, `eps`, `decay`). See `fastrms.presets`."""
        return cls(params, **preset_options(name, overrides))

    def _configure(self, hyper, clock):
        """Take the options in force (validated) and the step's counters."""
        self._hyper, self._clock = hyper, clock
        self._spec = spec.of(hyper)
        self._variant = self._spec.variant
        self._guarded, self._norms = guard.guarded(hyper), guard.needs_norm(hyper)
        self._dense_rows = hyper["dense_rows"]
        self._rowwise = self._spec.rowwise
        #: a step of one array that `_step_one` may take inline: no guard, no rows
        self._inline = self._single and not (self._guarded or self._dense_rows or self._rowwise)

    # ------------------------------------------------------------------ properties

    @property
    def params(self) -> "np.ndarray | list[np.ndarray]":
        """The parameter arrays (the user's own objects), in the structure given."""
        return self._slots[0].param if self._single else [s.param for s in self._slots]

    def _state_view(self, name):
        if name not in self._spec.names:
            return None
        kept = self._spec.state[self._spec.names.index(name)]
        if self._spec.codec.block:  # 8-bit blocks: their values, decoded (a copy), read-only: a write would be lost
            arrays = [self._spec.decode(name, getattr(s, name), s.flat.size).reshape(s.shape) for s in self._slots]
            for a in arrays:
                a.flags.writeable = False
        else:  # shaped like the param (rowwise square_avg: a value per row of its first axis)
            arrays = [getattr(s, name).reshape(kept.values(s.shape)) for s in self._slots]
        if self._spec.codec is storage.BFLOAT16:  # bit patterns, shown as the values they are
            arrays = [a.view(self._shown) for a in arrays]
        return arrays[0] if self._single else arrays

    @property
    def square_avg(self) -> "np.ndarray | list[np.ndarray]":
        """The squared-gradient averages `v`, shaped like the params (views of the state;
        with `state_storage="8bit"`, read-only float32 copies of its decoded values)."""
        return self._state_view("square_avg")

    @property
    def grad_avg(self) -> "np.ndarray | list[np.ndarray] | None":
        """The gradient averages `m` (centered only, else None)."""
        return self._state_view("grad_avg")

    @property
    def momentum_buffer(self) -> "np.ndarray | list[np.ndarray] | None":
        """The momentum buffers `b` (momentum > 0 only, else None)."""
        return self._state_view("momentum_buffer")

    @property
    def variant(self) -> kernels.Variant:
        """The compiled kernel variant the options select (`fastrms.kernels.Variant`)."""
        return self._variant

    @property
    def parallel(self) -> "list[bool]":
        """For each param, whether its step runs on a parallel shell here (by the bytes its
        dtype group moves, `fastrms.kernels.PARALLEL_MIN_BYTES`, and the threading layer)."""
        return self._plan.parallel_flags(len(self._slots))

    @property
    def kernel_calls(self) -> "list[str]":
        """How each dtype group of params is stepped, one kernel call each: `"dense"` (one
        array), `"segments"` (many arrays, a chunk table), `"flat"` (arrays that tile
        one buffer, see `fastrms.pack`) or `"rowwise"` (the row shell, over every row of
        each array: `state_layout="rowwise"`)."""
        return [g.kind for g in self._plan.groups]

    @property
    def hyperparameters(self) -> "dict[str, Any]":
        """A copy of the options in force (`learning_rate` may be a schedule)."""
        return dict(self._hyper)

    @property
    def step_count(self) -> int:
        """Steps taken so far."""
        return self._clock.step_count

    @property
    def state_nbytes(self) -> int:
        """Bytes the optimizer's state takes: the state arrays as stored (`state_storage`: 4
        or 8 bytes an element, 2 for bfloat16, 1 and the block scales for 8bit; `state_layout`
        "rowwise": one value a row) and `dense_rows`' per-row step counters. The params, and
        the copies `copy_to` writes, are the caller's."""
        return sum(getattr(s, name).nbytes for s in self._slots for name in s.names) + sum(
            s.row_step.nbytes for s in self._slots
        )

    @property
    def skipped_steps(self) -> int:
        """Steps refused by `skip_nonfinite` because a grad held a NaN or an infinity."""
        return self._clock.skipped_steps

    @property
    def last_grad_norm(self) -> "float | None":
        """With `clip_global_norm`: the 2-norm over all grads of the last step, before
        clipping (what `torch.nn.utils.clip_grad_norm_` returns; NaN or inf when a grad held
        one, also for a step `skip_nonfinite` refused). None without it, or before a step."""
        return self._last_grad_norm

    @property
    def current_learning_rate(self) -> float:
        """The learning rate the next step will use."""
        return self._clock.lr()

    @property
    def last_learning_rate(self) -> "float | None":
        """The learning rate the last step used (None before the first step)."""
        return self._clock.last_lr

    def __repr__(self):
        shown = ", ".join(f"{k}={v!r}" for k, v in self._hyper.items())
        sizes = [s.flat.size for s in self._slots]
        return f"RMSprop({len(sizes)} array(s), {sum(sizes)} elements, step_count={self._clock.step_count}, {shown})"

    # ------------------------------------------------------------------ the step

    def step(self, grads: "np.ndarray | Sequence[np.ndarray]") -> None:
        """Apply one update in place. `grads` has the structure of `params`; for params
        that tile one buffer (the views `fastrms.pack` returns) it may also be one flat
        grad array of that buffer's size: then the step is exactly one array's (16-bit
        grads: see `params`).

        Every check runs before anything is written: a rejected step leaves params, state,
        `step_count` and the schedule unchanged. All arrays of one dtype are stepped by one
        kernel call. One optimizer is stepped by one thread at a time: a second thread
        entering `step` while the first is inside gets a RuntimeError (nothing written by
        it); `state_dict`, `save` and `load_state_dict` from another thread wait for a running
        step to end, and a step waits for them: a snapshot is never torn, a load never mixed
        with a step. Returns None.
        """
        state = self._state
        acquired = state.acquire(False)
        if acquired and not self._stepping:
            self._stepping = True
        else:
            self._enter(state, "step", acquired)
        try:
            if self._inline and self._copies_given is None:
                self._step_one(grads)
            else:
                self._step(grads)
        finally:
            self._stepping = False
            state.release()

    def _enter(self, state, what, acquired):
        """Take the state's lock for a step (`acquired`: whether a try without waiting took
        it): waited for while a snapshot or a load holds it, refused (RuntimeError) while
        another step runs, in another thread or this one."""
        if acquired:
            if not self._stepping:
                self._stepping = True
                return
            state.release()  # this thread re-entered its own step
        elif not self._stepping:
            state.acquire()  # a snapshot or a load in another thread: wait for it (no step holds the lock)
            self._stepping = True
            return
        raise RuntimeError(
            f"RMSprop.{what} was entered by another thread while a step was running; one optimizer "
            "is stepped by one thread at a time (give each thread its own, or hold a lock)"
        )

    def _step(self, grads):
        if self._copies_given is not None:
            self._copies_writeable()
        if self._single:
            self._step_one(grads)
            return
        plan = self._plan
        checked, slots, low = memory.step_grads(grads, self._slots, plan.packed)
        self._owned.check(checked, slots, None if slots is not self._slots else 0, low)
        for s in self._slots:
            if not s.param.flags.writeable:  # the check inline: this loop runs per array per step
                memory.writeable(s, self._single, self._slots.index(s))  # raises, naming the param
        plan.current()
        if slots is self._slots:
            calls = plan.calls(plan.groups, checked, self._norms, low)
        else:
            calls = plan.packed_call(checked, self._norms, low)
        self._launch(calls, checked)

    def _copies_writeable(self):
        """Refuse a `copy_to` array the caller made read-only after construction (the step writes it)."""
        for i, c in enumerate(self._copies_given):
            if not c.flags.writeable:
                name = "copy_to" if self._single else f"copy_to[{i}]"
                raise ValueError(f"{name} was made read-only after construction; the step writes it")

    def _step_one(self, grad):
        """The step of an optimizer over one array: the same checks and kernel as a group's,
        without the group bookkeeping (this is the whole cost of a small step). The common
        case (a plain C-contiguous aligned grad of the param's dtype and shape, sharing no
        memory with the param or state, no guard or rows) is checked inline; anything else
        takes the checks that name what is wrong."""
        s, plan = self._slots[0], self._plan
        if (
            self._inline
            and type(grad) is np.ndarray
            and grad.dtype is s.dtype
            and grad.shape == s.shape
            and plan.generation == runtime.generation()
            and s.param.flags.writeable
        ):
            start, owned = contiguous_address(grad), self._owned
            k = bisect_left(owned.starts, start + grad.nbytes) - 1  # `memory.Owned.overlaps`, inline
            if start >= 0 and not start % s.dtype.itemsize and (k < 0 or owned.ends[k] <= start or not grad.nbytes):
                arrays = (s.flat, grad if grad.ndim == 1 else grad.reshape(-1), s.square_avg, s.grad_avg,
                          s.momentum_buffer)  # fmt: skip
                more = () if self._copy_to is None else (s.copy,)
                scalars = self._clock.plain()
                if plan.settled:  # Clock.take with GO, inlined: a small step's cost
                    plan.update()(scalars, *arrays, more)
                else:  # from then on the machine code's entry point
                    plan.update()(scalars, *arrays, *more)
                    plan.settle(scalars, arrays, more)
                self._clock.advance()
                return
        g, start = memory.check_grad(grad, s, None)
        if self._owned.overlaps(start, g.nbytes):
            raise memory.overlap(None)
        memory.writeable(s, True, 0)
        plan.current()
        low = g.dtype is not s.dtype and g.dtype != s.dtype  # a 16-bit grad
        calls = plan.calls(plan.groups, ((g, start),), self._norms, [0] if low else ())
        self._launch(calls, ((g, start),))

    def _launch(self, calls, checked):
        """Guard, then write: `calls` holds, per group, `(shell, arrays, check arrays, norm
        arrays)`; `checked` the grads (for the rare overflow path)."""
        verdict = guard.GO
        if self._guarded:
            verdict = self._plan.verdict(calls, checked, self._hyper)
            if verdict.norm is not None:
                self._last_grad_norm = verdict.norm
        self._clock.take(verdict, lambda scalars: self._write(calls, scalars))

    def _write(self, calls, scalars):
        """Run the step's kernels (`dense_rows`: every row brought up to date first, and
        marked as stepped after)."""
        t = self._clock.step_count + 1
        if self._dense_rows:
            rows_step.catch_up_slots(self._slots, t, self._hyper, self._variant, scalars, self._rowwise)
        self._plan.run(calls, scalars)
        if self._dense_rows:
            for slot in self._slots:
                slot.row_step[...] = t  # a dense step touches every row

    def step_rows(
        self,
        rows: "np.ndarray | Sequence[int] | Sequence[np.ndarray]",
        grad_rows: "np.ndarray | Sequence[np.ndarray]",
        param: "int | Sequence[int] | None" = None,
    ) -> None:
        """One step over only the named rows of 2-D params (embedding tables) and of their
        state, in one fused pass over those rows (parallel for big ones); every other row
        stays bitwise unchanged.

        `rows`: a 1-D integer array (or a list of ints) of row indices in `[0, rows)`
        (negative indices are refused, not wrapped); `grad_rows`: `(len(rows), columns)` in
        the param's dtype. Duplicate indices are summed first (in the order given), as
        torch's `coalesce` does. `param`: which param, for an optimizer over several; or a
        sequence of params, with `rows` and `grad_rows` sequences of as many, to step
        several tables as one step.

        A call is one step: the step count and the schedule advance once, however many
        tables it names, so two tables stepped per batch in one call keep one count (two
        calls would count two steps). Lazy by default: a row's state decays only when the
        row is touched (TensorFlow's sparse ops, torch's `SparseAdam`); bias correction
        uses the global step count. With `dense_rows=True` a row touched again after k
        untouched steps first gets the closed form of those k zero-gradient steps, so the
        run equals a dense one with zero grads elsewhere, up to rounding. `clip_value`
        applies per element; `clip_global_norm` to the norm over every named table's summed
        rows, and `skip_nonfinite` skips the whole call. Every check runs before anything is
        written (`fastrms.core.rows` has the rule).
        """
        state = self._state
        self._enter(state, "step_rows", state.acquire(False))
        try:
            self._step_rows(rows, grad_rows, param)
        finally:
            self._stepping = False
            state.release()

    def _step_rows(self, rows, grad_rows, param):
        if self._copy_to is not None:
            what = "16-bit params from their masters" if self._masters else "copy_to's copies"
            raise ValueError(f"step_rows does not write {what}; this optimizer steps with step")
        if self._spec.codec is not storage.NATIVE:
            raise ValueError(
                f"step_rows needs state_storage='native': its row kernels keep the state in the params' dtype "
                f"(this optimizer's is {self._hyper['state_storage']!r})"
            )
        self._plan.current()
        slots, plan = self._slots, self._plan
        tables = rows_step.named(
            param, rows, grad_rows,
            lambda *args: rows_step.slot_table(slots, self._single, self._owned, plan.parallel_of, *args),
        )  # fmt: skip
        norm = rows_step.step(
            tables, self._clock.step_count + 1, self._hyper, self._variant, plan.row_kernel, self._clock.take
        )  # fmt: skip
        if norm is not None:
            self._last_grad_norm = norm

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """The optimizer's state as a flat dict of NumPy arrays (copies) and Python scalars.

        Keys: `format_version`, `step_count`, `skipped_steps`, `num_params`, every hyperparameter
        (`learning_rate` only when it is a number, not a schedule; `clip_global_norm` and
        `clip_value` only when set) and `"<name>.<i>"` for each state array of param `i`;
        with 16-bit params, `"master_param.<i>"`, each one's float32 master.
        `load_state_dict` continues bit-identically.
        """
        with self._state:  # a step running in another thread ends first: never a torn snapshot
            d = checkpoint.state_dict(self._slots, self._hyper, self._clock.step_count, self._clock.skipped_steps)
            if self._masters:  # 16-bit params: their float32 masters are the optimizer's state
                for i, slot in enumerate(self._slots):
                    d[f"master_param.{i}"] = slot.flat.reshape(slot.shape).copy()
        return d

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a `state_dict` into this optimizer over the same params and variant.

        The variant (centring, momentum on/off, Nesterov, lr placement, weight-decay mode,
        maximize, bias correction, eps placement) must match. Numeric hyperparameters
        (learning rate, beta, epsilon, momentum, weight decay, initial scale), the clipping
        options (absent: off) and `skip_nonfinite` are restored from the dict; a schedule of this optimizer's is kept
        when the dict carries no `learning_rate`. Values are checked as well as shapes:
        counts must be integers >= 0, state finite and `square_avg >= 0`, hyperparameters
        in range for the params' dtypes. On any mismatch a TypeError/ValueError names it and
        nothing changes. The values are copied into the state arrays already allocated, so
        views of them stay valid.
        """
        step_count, skipped, hyper, arrays = checkpoint.validate(
            state_dict, self._slots, self._hyper, self._dtypes, self._masters
        )
        with self._state:  # a step running in another thread ends first, and none starts before this ends
            # Checked: now write, into the arrays already allocated (same variant, same names).
            for (i, name), a in arrays.items():
                np.copyto(getattr(self._slots[i], "flat" if name == "master_param" else name), a.reshape(-1))
            self._configure(hyper, Clock(hyper, self._dtypes, step_count, skipped, self._clock.last_lr))
            self._plan.choose(self._variant)  # the same arrays and variant: kernels chosen again

    # ------------------------------------------------------------------ checkpoints on disk

    def save(self, path: "str | bytes | os.PathLike") -> None:
        """Write `state_dict` to the `.npz` file `path` (the name is used as given),
        atomically: written to a temporary file `.fastrms-<pid>-<random>.tmp` in the same
        folder, flushed to disk, then renamed over `path`, so a crash never leaves a torn
        file under that name. An existing file keeps its permission bits; anything but a
        regular file at `path` (a folder, a FIFO, a device) is refused with ValueError. The
        params are not saved: they are the caller's (as with `torch.save(opt.state_dict())`).
        See `fastrms.core.checkpoint`."""
        d = self.state_dict()
        checkpoint.loadable(d)  # what load would refuse is not written
        checkpoint.write(path, d)

    def load(self, path: "str | bytes | os.PathLike") -> None:
        """Restore a checkpoint written by `save` into this optimizer (same params).

        Never unpickles, and reads no member larger than this optimizer's own state. A
        missing file raises FileNotFoundError; anything else wrong (junk, truncated, pickled,
        encrypted, another file type, wrong shapes, dtypes, values or variant) raises
        ValueError; either way the optimizer is left as it was.
        """
        d = checkpoint.read(path, self._slots)
        try:
            self.load_state_dict(d)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{os.fsdecode(os.fspath(path))!r} does not fit this optimizer: {exc}") from None


class DeviceRMSprop(RMSprop):
    """`fastrms.RMSprop` over params that live on a CUDA device: `RMSprop(params)` is one of
    these when its params are device arrays (numba-cuda's, CuPy's, torch CUDA tensors,
    anything with `__cuda_array_interface__`). It imports numba-cuda (through
    `fastrms.backend.cuda`), which fastrms itself never imports.

    The options are `fastrms.RMSprop`'s, checked by the same rules, and a step follows the
    same protocol (every check first, then the guard's verdict, then `Clock.take`), run by
    the CUDA backend (`fastrms.backend.cuda.Plan`: one launch per dtype, the tables kept).
    State dicts are the NumPy optimizer's, key for key (host copies): a run moves between a
    GPU and the CPU through `state_dict`/`load_state_dict` or `save`/`load`. A float32
    param's grads may be float16 (widened exactly as they are read, as on the CPU).
    16-bit models as on the CPU: float16 params (all of them) each get a float32 master on
    the device (`master_param.<i>` in `state_dict`), which the step updates and writes back
    rounded to nearest even in the same pass, a param element written from outside since
    the last step becoming its master first; or float32 params with `copy_to`, float16
    device arrays written in the same pass. bfloat16 has no `__cuda_array_interface__`
    type, so it does not reach the device this way. Refused on the device, naming the
    option: `state_layout="rowwise"`, `dense_rows` and `step_rows` (the CPU's)."""

    def __init__(self, params, learning_rate=0.001, beta=0.9, epsilon=1e-8, *, copy_to=None, **options):
        from .backend import cuda as backend

        options = O.resolve({**options, "learning_rate": learning_rate, "beta": beta, "epsilon": epsilon})
        self._single = backend.is_device_array(params)
        arrays = [params] if self._single else list(params)
        _all_on_device(backend, arrays, "params")
        names = ["params"] if self._single else [f"params[{i}]" for i in range(len(arrays))]
        faces = [backend.interface(p, name) for p, name in zip(arrays, names)]
        for name, (_, _, dtype) in zip(names, faces):
            if dtype not in (np.float32, np.float64, np.float16):
                raise TypeError(f"{name} must be float32, float64 or float16 on the device, got {dtype}")
        halves = [dtype == np.float16 for _, _, dtype in faces]
        self._masters = any(halves)
        if self._masters and not all(halves):
            i = halves.index(not halves[0])
            raise TypeError(
                f"{names[i]} is {faces[i][2]}, {names[0]} {faces[0][2]}: 16-bit params on the device are all "
                "float16, each with a float32 master; for a mix, keep float32 masters yourself and pass the float16 "
                "arrays as copy_to"
            )
        if self._masters and copy_to is not None:
            raise ValueError("copy_to is for float32 params; 16-bit params are written from their own masters")
        self._dtypes = (np.dtype(np.float32),) if self._masters else tuple(dict.fromkeys(d for _, _, d in faces))
        hyper = check_hyperparameters(options, self._dtypes)
        refused = {"state_layout='rowwise'": hyper["state_layout"] == "rowwise", "dense_rows=True": hyper["dense_rows"]}
        for what, given in refused.items():
            if given:
                raise ValueError(f"{what} is a CPU option: the CUDA backend does not take it")
        copies, copy = None, None
        if copy_to is not None:
            copies, copy = _device_copies(backend, copy_to, faces, self._single), storage.ARRAYS["float16"]
        self._arrays, self._shapes = arrays, [shape for _, shape, _ in faces]
        self._stepped = arrays  # what the kernels step as params: the float32 masters of 16-bit params
        if self._masters:
            copies, copy = [address for address, _, _ in faces], storage.MASTERS[storage.FLOAT16.tag]
            self._stepped = [backend.cuda.to_device(_host(backend, p).astype(np.float32)) for p in arrays]
        self._copies_given, self._copy_to = None, copies
        self._stepping = False
        self._state = threading.RLock()
        self._configure(hyper, Clock(hyper, self._dtypes))
        self._device = backend.Plan(self._stepped, self._spec, copies=copies, copy=copy)
        self._backend = backend
        self._last_grad_norm = None

    # ------------------------------------------------------------------ what the NumPy optimizer shows

    @property
    def params(self):
        """The parameter arrays (the user's own objects), in the structure given."""
        return self._arrays[0] if self._single else list(self._arrays)

    def _state_view(self, name):
        if name not in self._spec.names:
            return None
        if self._spec.codec.block:  # 8-bit blocks: their values, decoded on the host (a copy), read-only
            arrays = []
            for i, shape in enumerate(self._shapes):
                a = self._spec.decode(name, self._device.state(name, i).copy_to_host(), math.prod(shape)).reshape(shape)
                a.flags.writeable = False
                arrays.append(a)
        else:
            arrays = [self._device.state(name, i).reshape(shape) for i, shape in enumerate(self._shapes)]
        return arrays[0] if self._single else arrays

    @property
    def parallel(self):
        """Always False: the step runs on the device, not on CPU threads."""
        return [False] * len(self._arrays)

    @property
    def kernel_calls(self):
        """The launch of each dtype group: "cuda dense" (one array), "cuda segments" or, with
        8-bit state, "cuda blockwise"."""
        if self._spec.codec.block:
            return ["cuda blockwise"] * len(self._device.groups)
        return ["cuda dense" if len(g.indices) == 1 else "cuda segments" for g in self._device.groups]

    @property
    def state_nbytes(self):
        """Bytes of the optimizer's state on the device."""
        return self._device.nbytes

    def __repr__(self):
        sizes = [int(np.prod(s)) for s in self._shapes]
        return f"RMSprop({len(sizes)} CUDA array(s), {sum(sizes)} elements, step_count={self._clock.step_count})"

    # ------------------------------------------------------------------ the step

    def step(self, grads):
        """One step on the device: every grad checked first (a device array of its param's
        dtype and shape, C-contiguous, sharing no memory with a param or the state), then
        the guard (a host sync, only with `clip_global_norm` or `skip_nonfinite`), then one
        launch per dtype. Returns None without waiting for the device."""
        state = self._state
        self._enter(state, "step", state.acquire(False))
        try:
            backend = self._backend
            if self._single:
                given = [grads]
                if not backend.is_device_array(grads):
                    backend.interface(grads, "grads")  # raises, naming what it is
            else:
                if backend.is_device_array(grads) or not isinstance(grads, (list, tuple)):
                    raise TypeError(f"grads must be a list or tuple of {len(self._arrays)} device arrays, like params, "
                                    f"got {type(grads).__name__}")  # fmt: skip
                given = list(grads)
                if len(given) != len(self._arrays):
                    raise ValueError(
                        f"grads must hold {len(self._arrays)} device arrays, like params; got {len(given)}"
                    )
            plan = self._device
            plan.load(*plan.check_grads(given))
            verdict = guard.GO
            if self._guarded:
                verdict = guard.guard(
                    plan.sumsq, plan.nonfinite, lambda: [_host(backend, g) for g in given], self._hyper
                )
                if verdict.norm is not None:
                    self._last_grad_norm = verdict.norm
            self._clock.take(verdict, plan.run)
        finally:
            self._stepping = False
            state.release()

    def step_rows(self, rows, grad_rows, param=None):
        """Not on the device: `step_rows` is the CPU optimizer's."""
        raise ValueError("step_rows steps rows of CPU arrays; on a CUDA device, step the whole grad")

    # ------------------------------------------------------------------ state dicts: the NumPy optimizer's

    def _shadow(self, with_state):
        """Host `Slot`s standing for the params (their shapes and dtypes), holding host
        copies of the state when `with_state`: what `fastrms.core.checkpoint` reads."""
        slots = []
        for i, shape in enumerate(self._shapes):
            slot = Slot(None, np.empty(shape, self._device.dtypes[i]), self._spec.names)
            if with_state:
                for name in self._spec.names:
                    setattr(slot, name, self._device.state(name, i).copy_to_host())
            slots.append(slot)
        return slots

    def state_dict(self):
        """`fastrms.RMSprop.state_dict`: the same keys, the state copied to the host."""
        with self._state:
            slots = self._shadow(True)
            d = checkpoint.state_dict(slots, self._hyper, self._clock.step_count, self._clock.skipped_steps)
            if self._masters:  # float16 params: their float32 masters are the optimizer's state
                for i, master in enumerate(self._stepped):
                    d[f"master_param.{i}"] = master.copy_to_host()
            return d

    def load_state_dict(self, state_dict):
        """`fastrms.RMSprop.load_state_dict`, the state copied to the device (a dict saved
        on the CPU loads here, and the reverse)."""
        step_count, skipped, hyper, arrays = checkpoint.validate(
            state_dict, self._shadow(False), self._hyper, self._dtypes, self._masters
        )
        with self._state:
            for (i, name), a in arrays.items():
                if name == "master_param":
                    self._stepped[i].copy_to_device(np.ascontiguousarray(a, np.float32))
                else:
                    self._device.state(name, i).copy_to_device(np.ascontiguousarray(a).reshape(-1))
            self._configure(hyper, Clock(hyper, self._dtypes, step_count, skipped, self._clock.last_lr))

    def load(self, path):
        """`fastrms.RMSprop.load`: a checkpoint written by `save`, on the CPU or a device."""
        d = checkpoint.read(path, self._shadow(False))
        try:
            self.load_state_dict(d)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path!r} does not fit this optimizer: {exc}") from None


def _all_on_device(backend, arrays, what):
    for i, a in enumerate(arrays):
        if not backend.is_device_array(a):
            raise TypeError(
                f"{what}[{i}] is a {type(a).__module__}.{type(a).__name__} on the host, the others live on a "
                "CUDA device: one optimizer steps its params on one device"
            )


def _device_copies(backend, copy_to, faces, single):
    """The addresses of `copy_to`'s float16 device arrays, one per float32 param of
    `faces` (`backend.interface`'s), of its shape (TypeError or ValueError naming the copy;
    the overlaps are the plan's to refuse)."""
    if single and not backend.is_device_array(copy_to):
        raise TypeError(f"copy_to must be a CUDA device array like params, got {type(copy_to).__name__}")
    if not single and (not isinstance(copy_to, (list, tuple)) or len(copy_to) != len(faces)):
        got = f"{len(copy_to)} arrays" if isinstance(copy_to, (list, tuple)) else type(copy_to).__name__
        raise TypeError(f"copy_to must be a list or tuple of {len(faces)} device arrays, one per param, got {got}")
    given = [copy_to] if single else list(copy_to)
    addresses = []
    for i, (c, (_, shape, dtype)) in enumerate(zip(given, faces)):
        name = "copy_to" if single else f"copy_to[{i}]"
        address, got_shape, got_dtype = backend.interface(c, name)
        if got_dtype != np.float16:
            raise TypeError(f"{name} must be float16 on the device, got {got_dtype}")
        if dtype != np.float32:
            raise TypeError(f"{name}: a float16 copy is of a float32 param; {'params' if single else f'params[{i}]'} "
                            f"is {dtype}")  # fmt: skip
        if got_shape != shape:
            raise ValueError(f"{name} must have its param's shape {shape}, got {got_shape}")
        addresses.append(address)
    return addresses


def _host(backend, a):
    """A host copy of device array `a` (the guard's rare float64-overflow path)."""
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    return backend.cuda.as_cuda_array(a).copy_to_host()


def _on_device(params):
    """Whether `params` (one array, or a list or tuple of them) live on a CUDA device: the
    first has `__cuda_array_interface__` (or is numba-cuda's simulated device array). Reads
    nothing else, and never a generator."""
    first = params[0] if isinstance(params, (list, tuple)) and params else params
    kind = type(first)
    return hasattr(kind, "__cuda_array_interface__") or kind.__name__ == "FakeCUDAArray"


RMSprop.__init__.__signature__ = O.signature(("copy_to",))  # type: ignore[attr-defined]  # for help() and inspect
RMSprop.__new__.__signature__ = RMSprop.__init__.__signature__  # type: ignore[attr-defined]  # inspect reads __new__ first
