"""The seed article's integrated `rmsprop()` function, running the fused kernel."""

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .core.checks import count
from .optimizer import RMSprop
from .schedules import constant, step_decay

if TYPE_CHECKING:  # the static types of **options (generated from the options table)
    from typing_extensions import Unpack

    from ._typing import Options


def rmsprop(
    theta: "np.typing.ArrayLike",
    num_iterations: int,
    calculate_gradient: "Callable[[np.ndarray], np.typing.ArrayLike]",
    learning_rate: "float | Callable[[int], float]" = 0.001,
    beta: float = 0.9,
    epsilon: float = 1e-8,
    *,
    decay_every: "int | None" = 500,
    decay_factor: float = 0.95,
    **options: "Unpack[Options]",
) -> np.ndarray:
    """Run `num_iterations` RMSprop steps from `theta` and return the final parameters.

    The seed article's function and defaults: each iteration computes
    `g = calculate_gradient(theta)`, then:

        v <- beta * v + (1 - beta) * g^2
        theta <- theta - lr / (sqrt(v) + epsilon) * g

    and the learning rate is multiplied by `decay_factor` after every `decay_every`
    iterations (the seed's x0.95 every 500; `decay_every=None` keeps it constant). A
    schedule (callable `count -> lr`) may be passed as `learning_rate` instead.

    `theta` (an array or anything `np.asarray` turns into a float32/float64 array) is
    copied: the caller's array is never modified. A gradient of another float dtype is cast
    to `theta`'s. `options` are `fastrms.RMSprop`'s keyword options (`momentum`,
    `centered`, ...).
    """
    if isinstance(theta, np.ma.MaskedArray):
        raise TypeError("theta must be a plain array, got a masked array: its mask would be ignored")
    try:
        work = np.array(theta, copy=True, order="C", subok=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"theta must be a float32 or float64 array, got {type(theta).__name__}: {exc}") from None
    if work.dtype.kind != "f" or work.dtype.itemsize not in (4, 8):
        raise TypeError(f"theta must hold float32 or float64 values, got {work.dtype}")
    num_iterations = count("num_iterations", num_iterations, minimum=0)
    if not callable(calculate_gradient):
        raise TypeError(f"calculate_gradient must be callable, got {type(calculate_gradient).__name__}")
    if callable(learning_rate):
        schedule = learning_rate
    elif decay_every is None:
        schedule = constant(learning_rate)
    else:
        schedule = step_decay(learning_rate, decay_factor, decay_every)
    try:
        opt = RMSprop(work, schedule, beta, epsilon, **options)
    except (TypeError, ValueError) as exc:
        raise type(exc)(str(exc).replace("params", "theta", 1)) from None
    for t in range(num_iterations):
        g = _gradient(calculate_gradient(work), work, t)
        opt.step(g)
    return work


def _gradient(value, theta, iteration):
    """`calculate_gradient`'s return value as an array shaped and typed like `theta`."""
    where = f"calculate_gradient(theta) at iteration {iteration}"
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(f"{where} returned a masked array; its mask would be ignored")
    try:
        g = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{where} must return a real array, got {type(value).__name__}: {exc}") from None
    if g.dtype.kind not in "fiu":
        raise TypeError(f"{where} must return a real array, got dtype {g.dtype}")
    if g.shape != theta.shape:
        raise ValueError(f"{where} returned shape {g.shape}; expected theta's shape {theta.shape}")
    if g.dtype != theta.dtype:
        g = g.astype(theta.dtype)
    elif not g.flags.c_contiguous or not g.flags.aligned or np.may_share_memory(g, theta):
        g = np.array(g, order="C")  # e.g. the callback returned theta itself, or a strided view
    return g
