"""The counters of a step, for every front end that counts steps itself (the NumPy optimizer,
its `step_rows`, `fastrms.dask`): the learning rate of the next step, the kernel scalars
built from it, and the step and skip counts.

    lr_t      = learning_rate                  (a number)
              | schedule(t - 1)                (a schedule: called with the steps already taken)
    scalars_t = fastrms.options.scalars(options, lr_t, t)

`fastrms.torch` counts as torch does (a `step` tensor per param) and the pure step takes `t`
from its caller; both build their scalars with `fastrms.options.scalars` too.
"""

import math

from . import options as O

__all__ = ["Clock"]


class Clock:
    """The step count `step_count`, the steps `skipped_steps` refused, the learning rate the
    last step used (`last_lr`) and the next step's (`lr()`, `scalars()`). A schedule's value
    is checked as a learning rate is (`fastrms.options.scheduled_lr`). The scalars are rebuilt
    only when the learning rate changes or bias correction is on (they depend on `t` then):
    a small step pays one comparison."""

    __slots__ = ("step_count", "skipped_steps", "last_lr", "_options", "_dtypes", "_schedule", "_lr", "_every",
                 "_scalars", "_pending")  # fmt: skip

    def __init__(self, options, dtypes, step_count=0, skipped_steps=0, last_lr=None):
        lr = options["learning_rate"]
        self._options, self._dtypes = options, tuple(dtypes)
        self._schedule = lr if callable(lr) else None
        self._lr = None if callable(lr) else lr
        self._every = options["bias_correction"]
        self._scalars = O.scalars(options, math.nan, 1)  # NaN: never equal, so the first step builds them
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
        is kept for `advance`."""
        lr = self.lr()
        if self._every or lr != self._scalars[0]:  # else the last step's scalars hold
            self._scalars = O.scalars(self._options, lr, self.step_count + 1)
        self._pending = lr
        return self._scalars

    @property
    def pending_lr(self):
        """The learning rate `scalars` returned last (the step being taken)."""
        return self._pending

    def advance(self):
        """A step was taken (with the learning rate `scalars` or `lr` gave)."""
        self.step_count += 1
        self.last_lr = self._pending

    def advance_with(self, lr):
        """A step was taken with `lr` (a front end that evaluated `lr()` itself)."""
        self._pending = lr
        self.advance()

    def skip(self):
        """A step the guard refused: counted, nothing else changes."""
        self.skipped_steps += 1
