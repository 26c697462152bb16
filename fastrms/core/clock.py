"""The counters of a step, for every front end that counts steps itself (the NumPy optimizer,
its `step_rows`, `fastrms.dask`): the learning rate of the next step, the kernel scalars
built from it, and the step and skip counts.

    lr_t      = learning_rate                  (a number)
              | schedule(t - 1)                (a schedule: called with the steps already taken)
    scalars_t = fastrms.core.options.scalars(options, lr_t, t)
    a step    = checks, then the guard's verdict, then Clock.take(verdict, run):
                skipped_steps += 1 (refused) | run(scalars_t * clip coefficient); step_count += 1

`fastrms.torch` counts as torch does (a `step` tensor per param) and the pure step takes `t`
from its caller; both build their scalars with `fastrms.core.options.scalars` too.
"""

from . import options as O

__all__ = ["Clock"]


class Clock:
    """The step count `step_count`, the steps `skipped_steps` refused, the learning rate the
    last step used (`last_lr`) and the next step's (`lr()`, `scalars()`). A schedule's value
    is checked as a learning rate is (`fastrms.core.options.scheduled_lr`). The scalars are rebuilt
    only when the learning rate changes or bias correction is on (they depend on `t` then):
    a small step pays one comparison."""

    __slots__ = ("step_count", "skipped_steps", "last_lr", "_options", "_dtypes", "_schedule", "_lr", "_every",
                 "_scalars", "_plain", "_pending")  # fmt: skip

    def __init__(self, options, dtypes, step_count=0, skipped_steps=0, last_lr=None):
        lr = options["learning_rate"]
        self._options, self._dtypes = options, tuple(dtypes)
        self._schedule = lr if callable(lr) else None
        self._lr = None if callable(lr) else lr
        self._every = options["bias_correction"]
        self._scalars = self._plain = None  # built by the first step
        self._pending = None
        self.step_count, self.skipped_steps, self.last_lr = step_count, skipped_steps, last_lr

    @property
    def schedule(self):
        """The schedule (`count -> lr`), or None for a constant learning rate."""
        return self._schedule

    def lr(self):
        """The learning rate of the next step (the schedule's value at `step_count`)."""
        if self._schedule is None:
            return self._lr
        return O.scheduled_lr(self._schedule, self.step_count, self._options["weight_decay"], self._dtypes)

    def scalars(self):
        """The kernel scalars of the next step (`fastrms.kernels.Scalars`); its learning rate
        is kept for `advance` (`last_lr`)."""
        lr = self.lr()
        if self._every or self._scalars is None or lr != self._scalars[0]:  # else the last step's hold
            self._scalars = O.scalars(self._options, lr, self.step_count + 1)
            self._plain = tuple(self._scalars)
        self._pending = lr
        return self._scalars

    def plain(self):
        """`scalars()` as a plain tuple, as the kernels take them (built once with it: Numba
        types a NamedTuple 2.4x slower)."""
        self.scalars()
        return self._plain

    def advance(self):
        """A step was taken (with the learning rate `scalars` gave)."""
        self.step_count += 1
        self.last_lr = self._pending

    def skip(self):
        """A step the guard refused: counted, nothing else changes."""
        self.skipped_steps += 1

    def take(self, verdict, run):
        """One step by the protocol every counting front end follows, after its checks and
        the guard's `verdict` (`fastrms.core.guard.Verdict`): a refused step is counted in
        `skipped_steps` and nothing runs; otherwise `run(scalars)` writes the step with this
        step's scalars, the clipping coefficient folded into `grad_scale`, and then the step
        is counted. An exception from `run` (raised before it writes) counts nothing.
        Returns whether the step was taken."""
        if not verdict.stepped:
            self.skipped_steps += 1
            return False
        run(verdict.scaled(self.scalars()))
        self.advance()
        return True
