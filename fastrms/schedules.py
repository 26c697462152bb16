"""Learning-rate schedules: callables `count -> learning rate`.

`count` is the number of steps already taken (0 for the first step), as in optax. Every
schedule is a small immutable object with a readable `repr`; they compose: a schedule can
be the `then` of `linear_warmup`, or a piece of `join_schedules`, and any
callable `int -> float` can stand in for one.

The seed article's decay is `step_decay`: multiply by `factor` every `every` steps:

    lr(count) = init * factor ** (count // every)

so `step_decay(0.001, 0.95, 500)` gives 0.001 for steps 1..500 and 0.00095 for 501..1000.
"""

import math
from dataclasses import dataclass

from .core.checks import count as _count
from .core.checks import number as _number

__all__ = [
    "constant",
    "step_decay",
    "exponential_decay",
    "cosine_decay",
    "linear_warmup",
    "join_schedules",
]


def _schedule(name, value):
    if callable(value):
        return value
    return constant(_number(name, value, low=0.0))


@dataclass(frozen=True)
class constant:
    """`lr(count) = value`."""

    value: float

    def __post_init__(self):
        object.__setattr__(self, "value", _number("value", self.value, low=0.0))

    def __call__(self, count):
        return self.value


@dataclass(frozen=True)
class step_decay:
    """The seed's decay: `lr(count) = init * factor ** (count // every)`."""

    init: float
    factor: float = 0.95
    every: int = 500

    def __post_init__(self):
        object.__setattr__(self, "init", _number("init", self.init, low=0.0))
        object.__setattr__(self, "factor", _number("factor", self.factor, low=0.0))
        object.__setattr__(self, "every", _count("every", self.every))

    def __call__(self, count):
        return self.init * self.factor ** (count // self.every)


@dataclass(frozen=True)
class exponential_decay:
    """`lr(count) = init * rate ** (count / transition_steps)` (optax's
    `exponential_decay`); with `staircase` the exponent is floored. `end` bounds the
    value from below when decaying (from above when `rate > 1`)."""

    init: float
    rate: float
    transition_steps: int = 1
    staircase: bool = False
    end: "float | None" = None

    def __post_init__(self):
        object.__setattr__(self, "init", _number("init", self.init, low=0.0))
        object.__setattr__(self, "rate", _number("rate", self.rate, low=0.0))
        object.__setattr__(self, "transition_steps", _count("transition_steps", self.transition_steps))
        if not isinstance(self.staircase, bool):
            raise TypeError(f"staircase must be a bool, got {type(self.staircase).__name__}")
        if self.end is not None:
            object.__setattr__(self, "end", _number("end", self.end, low=0.0))

    def __call__(self, count):
        exponent = count / self.transition_steps
        if self.staircase:
            exponent = math.floor(exponent)
        value = self.init * self.rate**exponent
        if self.end is not None:
            value = max(value, self.end) if self.rate < 1 else min(value, self.end)
        return value


@dataclass(frozen=True)
class cosine_decay:
    """`lr(count) = init * ((1 - alpha) * (1 + cos(pi * min(count, decay_steps) /
    decay_steps)) / 2 + alpha)` (optax's `cosine_decay_schedule`): from `init` down to
    `alpha * init` over `decay_steps`, then flat."""

    init: float
    decay_steps: int
    alpha: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "init", _number("init", self.init, low=0.0))
        object.__setattr__(self, "decay_steps", _count("decay_steps", self.decay_steps))
        object.__setattr__(self, "alpha", _number("alpha", self.alpha, low=0.0, high=1.0))

    def __call__(self, count):
        frac = min(count, self.decay_steps) / self.decay_steps
        return self.init * ((1.0 - self.alpha) * 0.5 * (1.0 + math.cos(math.pi * frac)) + self.alpha)


@dataclass(frozen=True)
class linear_warmup:
    """Linear from `start` to `then(0)` over `warmup_steps` steps, then `then`
    shifted to begin where the warm-up ends: `then` is a number or a schedule."""

    then: object
    warmup_steps: int
    start: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "then", _schedule("then", self.then))
        object.__setattr__(self, "warmup_steps", _count("warmup_steps", self.warmup_steps))
        object.__setattr__(self, "start", _number("start", self.start, low=0.0))

    def __call__(self, count):
        if count < self.warmup_steps:
            peak = self.then(0)
            return self.start + (peak - self.start) * (count / self.warmup_steps)
        return self.then(count - self.warmup_steps)


@dataclass(frozen=True)
class join_schedules:
    """Piecewise: `schedules[i]` from `boundaries[i-1]` on, each restarted at its own
    count 0 (optax's `join_schedules`). `len(boundaries) == len(schedules) - 1`."""

    schedules: tuple
    boundaries: tuple

    def __post_init__(self):
        schedules = tuple(_schedule(f"schedules[{i}]", s) for i, s in enumerate(self.schedules))
        boundaries = tuple(_count(f"boundaries[{i}]", b, minimum=0) for i, b in enumerate(self.boundaries))
        if not schedules:
            raise ValueError("schedules must hold at least one schedule")
        if len(boundaries) != len(schedules) - 1:
            raise ValueError(
                f"boundaries must have len(schedules) - 1 = {len(schedules) - 1} entries, got {len(boundaries)}"
            )
        if any(b >= c for b, c in zip(boundaries, boundaries[1:])):
            raise ValueError(f"boundaries must increase strictly, got {boundaries}")
        object.__setattr__(self, "schedules", schedules)
        object.__setattr__(self, "boundaries", boundaries)

    def __call__(self, count):
        start = 0
        for schedule, boundary in zip(self.schedules, self.boundaries):
            if count < boundary:
                return schedule(count - start)
            start = boundary
        return self.schedules[-1](count - start)
